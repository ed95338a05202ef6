"""One recipe for every entry point (issue 21): each scorer x each method, through each entry point,
keeps the same tokens and gives the same next-token logits as ``chunkkv.compress``.

Entry points: ``compress`` (the reference), ``prefill`` + ``compress_from_capture`` (what ``eval
--methods``, ``demo``, ``inspect``, the recall task and the studies use, the capture shared with
another method), ``generate`` (the text API), and the eval runner with one method and with
several (its records' contexts are recorded as they are built). Then the commands of the issue:
``chunkkv eval --methods ... --scoring hybrid`` and ``--scoring reconstruction / probe`` run, and
keep what ``generate`` keeps for the same method and document.
"""

from __future__ import annotations

import pytest
import torch

import chunkkv
import chunkkv.evaluation.runner as runner
from chunkkv.methods import H2O, ChunkKV, FullKV, KVPressChunkKV, KVPressSnapKV, PyramidKV, SnapKV, StreamingLLM
from chunkkv.pipeline import compress, compress_from_capture, prefill
from chunkkv.scorers import SCORINGS

from test_cli import QUESTION_TEXT, save_tiny_model, write_context

METHODS = {
    "chunkkv": ChunkKV(keep_fraction=0.3, window=6, chunk_size=5),
    "chunkkv-reuse": ChunkKV(keep_tokens=40, window=6, chunk_size=4, reuse_depth=2),
    "snapkv": SnapKV(keep_fraction=0.3, window=6),
    "pyramidkv": PyramidKV(keep_tokens=40, window=6),
    "h2o": H2O(keep_fraction=0.3, window=6),
    "kvpress-chunkkv": KVPressChunkKV(remove_fraction=0.7, window=6),
    "kvpress-snapkv": KVPressSnapKV(keep_fraction=0.3, window=6),
    "streamingllm": StreamingLLM(keep_tokens=40),
    "full": FullKV(),
}
CASES = [(m, s) for m in METHODS for s in SCORINGS if s == "window" or METHODS[m].scores_tokens]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_model(tmp_path_factory.mktemp("contract") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = write_context(tmp_path_factory.mktemp("doc") / "doc.txt").read_text()
    return model, tokenizer, text


def _method(name: str, scoring: str):
    from dataclasses import replace

    method = METHODS[name]
    return method if scoring == "window" else replace(method, scoring=scoring)


def assert_same(got, want, what: str = "") -> None:
    """Same kept positions on every layer and row, same next-token logits."""
    assert got.cache.pruned_layers == want.cache.pruned_layers, what
    rows = want.input_ids.shape[0]
    for layer in want.cache.pruned_layers:
        for row in range(rows):
            heads = want.cache.layers[layer].keys.shape[1]
            for head in range(heads) if want.method.name in ("snapkv", "pyramidkv", "h2o", "snapkv-kvpress") else [None]:
                assert torch.equal(got.kept_positions(layer, row, head), want.kept_positions(layer, row, head)), \
                    f"{what}: layer {layer} row {row} head {head}"
    torch.testing.assert_close(got.next_logits, want.next_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,scoring", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_every_entry_point_keeps_what_compress_keeps(tiny, name, scoring):
    model, tok, text = tiny
    method = _method(name, scoring)
    ids = tok(text, return_tensors="pt")["input_ids"]
    want = compress(model, ids, method=method, tokenizer=tok, chat_template=False)
    # one capture shared with another method (the one the other scores decide nothing here)
    capture = prefill(model, ids, methods=[method, SnapKV(keep_fraction=0.5, window=8)], tokenizer=tok,
                      chat_template=False)
    assert_same(compress_from_capture(capture, method), want, "prefill + compress_from_capture")
    assert_same(compress_from_capture(capture, method), want, "the same capture, a second time")
    # the text API, question-agnostic, the scoring asked for by name
    result = chunkkv.generate(model, tok, text, [QUESTION_TEXT], method, scoring=scoring, chat_template=False,
                              sampling=chunkkv.Sampling(max_new_tokens=2))
    assert_same(result.context, want, "generate")


@pytest.fixture()
def recorded(monkeypatch):
    """Every context the eval runner builds, with the ids it was built from."""
    seen = []

    def wrap(fn, ids_of):
        def recording(*args, **kwargs):
            ctx = fn(*args, **kwargs)
            seen.append((ids_of(args, kwargs), ctx.fork()))  # a fork: the runner extends ctx with the question
            return ctx
        return recording

    monkeypatch.setattr(runner, "compress", wrap(runner.compress, lambda a, k: a[1]))
    monkeypatch.setattr(runner, "compress_from_capture",
                        wrap(runner.compress_from_capture, lambda a, k: a[0].input_ids))
    return seen


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("query_aware", [False, True], ids=["agnostic", "query-aware"])
def test_the_eval_runner_keeps_what_compress_keeps(tiny, tmp_path, recorded, scoring, query_aware):
    model, tok, _ = tiny
    methods = {n: _method(n, scoring) for n in ("chunkkv", "snapkv", "h2o") if METHODS[n].scores_tokens}
    kw = dict(task="niah", lengths=[90], depths=[50.0], max_new_tokens=2, progress=False, query_aware=query_aware,
              chat_template=False)
    runner.run_eval(model, tok, out_dir=str(tmp_path / "one"), method=methods["chunkkv"], **kw)
    runner.run_eval_many(model, tok, runner.EvalConfig(out_dir=str(tmp_path / "many"), **kw), methods)
    assert len(recorded) == 1 + len(methods)
    for ids, ctx in recorded:
        assert_same(ctx, compress(model, ids, method=ctx.method, tokenizer=tok, chat_template=False), ctx.method.name)


# --- the commands of the issue --------------------------------------------------------------------
TESTBED_EVAL = ["eval", "--model", "testbed", "--task", "niah", "--lengths", "256", "--depths", "50", "--limit", "1",
                "--keep-fraction", "0.2", "--no-progress", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def testbed():
    from chunkkv.cli_common import testbed_path
    from chunkkv.pretrained import load_pretrained

    return load_pretrained(str(testbed_path()), device="cpu")


@pytest.mark.parametrize("flags", [
    ["--methods", "chunkkv,snapkv", "--scoring", "hybrid"],
    ["--method", "chunkkv", "--scoring", "reconstruction"],
    ["--methods", "chunkkv,snapkv", "--scoring", "probe"],
    ["--method", "chunkkv", "--scoring", "probe", "--query-aware"],
], ids=["methods-hybrid", "reconstruction", "methods-probe", "query-aware-probe"])
def test_eval_commands_keep_what_generate_keeps(testbed, tmp_path, recorded, flags):
    """``chunkkv eval`` with a scoring that runs a pass (one method or several) runs, and each method
    keeps what ``chunkkv.generate`` keeps on the same document with the same method and scoring."""
    from chunkkv.cli import main
    from chunkkv.evaluation import EvalConfig
    from chunkkv.evaluation.tasks import build_task
    from chunkkv.methods import make_method

    assert main([*TESTBED_EVAL, *flags, "--out", str(tmp_path / "out")]) == 0
    model, tok = testbed
    query_aware = "--query-aware" in flags
    sample = build_task(EvalConfig(task="niah", out_dir="x", lengths=[256], depths=[50.0], limit=1)).samples(tok)[0]
    scoring = flags[flags.index("--scoring") + 1]
    names = flags[flags.index("--methods") + 1].split(",") if "--methods" in flags else ["chunkkv"]
    assert [ctx.method.name for _ids, ctx in recorded] == names
    for (_ids, ctx), name in zip(recorded, names):
        assert ctx.method.scoring == scoring
        result = chunkkv.generate(model, tok, sample.context, [sample.question], make_method(name, keep_fraction=0.2),
                                  scoring=scoring, query_aware=query_aware, sampling=chunkkv.Sampling(max_new_tokens=1))
        for layer in ctx.cache.pruned_layers:
            assert torch.equal(ctx.kept_positions(layer), result.context.kept_positions(layer)), f"{name} layer {layer}"
