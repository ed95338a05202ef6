"""ChunkKV inside transformers' continuous batching (chunkkv.serving) and ``chunkkv serve``.

The exactness tests run several requests of different lengths through ``generate_batch`` /
``ContinuousBatchingManager`` with compression and compare every generated token with a dense
reference: the same request alone, a plain ``DynamicCache`` with the same prompt positions dropped,
greedy, new tokens at their original positions. Dropped pages are filled with NaN as soon as they
are freed (``poison_freed``), so a request that read any page it does not own, or one it dropped,
would produce NaN logits and different tokens; block tables are checked disjoint after every step.
"""

from __future__ import annotations

import math
import re
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import random_prompt, tiny_model
from transformers import ContinuousBatchingConfig, GenerationConfig

import chunkkv
import chunkkv.serving as serving
from chunkkv.budget import Budget
from chunkkv.scoring import window_attention_scores
from chunkkv.serving.attention import install_tap, tag_model, untag_model
from chunkkv.serving.pages import kept_positions, plan_pages, select_pages

def _skip_reason() -> str | None:
    """Why this module cannot run here (another transformers than the hooks were written for), or None."""
    try:
        serving.check_transformers()
    except serving.ServingError as exc:
        return str(exc)
    return None


# Unless CHUNKKV_REQUIRE_SERVE=1 (an environment installed with the serve extra), an untested transformers
# skips the module instead of failing it: the hooks refuse to run there by design.
if _skip_reason() and os.environ.get("CHUNKKV_REQUIRE_SERVE") != "1":
    pytest.skip(_skip_reason(), allow_module_level=True)


def needs_serve_extras():
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        if os.environ.get("CHUNKKV_REQUIRE_SERVE") == "1":
            raise AssertionError("CHUNKKV_REQUIRE_SERVE=1 but fastapi / uvicorn / openai are missing")
        pytest.skip("transformers serve needs the serve extra: pip install 'chunkkv[serve]'")


PAGE = 16
WINDOW = 8
NEW_TOKENS = 10
LENGTHS = (20, 100, 150, 211, 260)  # one short enough to keep everything, the rest split across batches


def greedy(max_new_tokens: int = NEW_TOKENS) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1)


def cb_config(num_blocks: int = 160, max_batch_tokens: int = 96) -> ContinuousBatchingConfig:
    return ContinuousBatchingConfig(num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)


def prompts(lengths=LENGTHS) -> list[list[int]]:
    return [random_prompt(1, n, seed=1000 + n)[0].tolist() for n in lengths]


def sharp_model(**kw):
    """A tiny random Llama with larger weights than the default init (0.1, not 0.02): its logits depend on
    positions clearly enough that a wrong RoPE offset changes the greedy tokens (see the power check)."""
    return tiny_model(initializer_range=0.1, **kw)


def compressed_model(keep_fraction: float = 0.4, **kw):
    model = sharp_model()
    handle = serving.enable(model, chunkkv.ChunkKV(keep_fraction=keep_fraction, window=WINDOW), page_size=PAGE,
                            trace=True, check_invariants=True, poison_freed=True, **kw)
    return model, handle


@pytest.fixture(scope="module")
def batch_run():
    """Five requests through generate_batch with compression: (model, handle, prompts, outputs by request id)."""
    torch.manual_seed(0)
    model, handle = compressed_model()
    inputs = prompts()
    outputs = model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config())
    return model, handle, inputs, outputs


# --- the page budget (pure) ------------------------------------------------------------------------
@pytest.mark.parametrize("n_tokens", [1, 7, 8, 16, 17, 100, 257, 2048])
@pytest.mark.parametrize("budget", [Budget(keep_fraction=0.2), Budget(keep_tokens=40), Budget(remove_fraction=0.5)])
def test_plan_pages_keeps_an_exact_number_of_whole_pages(n_tokens, budget):
    plan = plan_pages(n_tokens, PAGE, budget, WINDOW)
    n_pages = math.ceil(n_tokens / PAGE)
    win = min(WINDOW, budget.kept(n_tokens))
    tail_start = (n_tokens - win) // PAGE
    assert plan.n_pages == n_pages and plan.tail_start == tail_start
    assert plan.keep_pages == min(n_pages, max(n_pages - tail_start, math.ceil(budget.kept(n_tokens) / PAGE)))
    assert plan.keep_pages * PAGE >= budget.kept(n_tokens) or plan.keep_pages == n_pages  # holds the token budget
    assert plan.stored_tokens == n_tokens - plan.drop_pages * PAGE
    assert plan.tail_start <= n_pages - 1  # the partial last page is always kept


def test_short_prompts_keep_everything():
    for n in (1, 5, WINDOW, PAGE):
        assert not plan_pages(n, PAGE, Budget(keep_fraction=0.1), WINDOW).compresses


def test_select_pages_takes_the_best_whole_pages_and_the_tail():
    g = torch.Generator().manual_seed(3)
    n_tokens = 203
    plan = plan_pages(n_tokens, PAGE, Budget(keep_fraction=0.35), WINDOW)
    scores = torch.rand(2, n_tokens, generator=g)
    pages = select_pages(scores, plan, pooling="none", kernel=1).tolist()
    assert pages == sorted(pages) and len(pages) == plan.keep_pages
    tail = list(range(plan.tail_start, plan.n_pages))
    assert pages[-len(tail):] == tail
    # naive reference: mean of the head-summed scores per prefix page, best first, ties to the earlier page
    summed = scores.sum(0)
    means = [(-float(summed[p * PAGE:(p + 1) * PAGE].mean()), p) for p in range(plan.tail_start)]
    best = sorted(p for _, p in sorted(means)[: plan.prefix_pages_kept])
    assert pages[: plan.prefix_pages_kept] == best
    assert kept_positions(pages, plan)[-1] == n_tokens - 1


# --- exactness through the engine -----------------------------------------------------------------
def test_every_token_matches_the_dense_reference(batch_run):
    model, handle, inputs, outputs = batch_run
    records = handle.compressor.records
    assert len(outputs) == len(inputs)
    compressed = 0
    for (rid, out), prompt in zip(outputs.items(), inputs):
        assert out.error is None
        record = records[rid]
        reference = serving.dense_greedy(model, prompt, record.kept_positions, NEW_TOKENS)
        assert out.generated_tokens == reference, rid
        compressed += record.plan.compresses
    assert compressed == len(inputs) - 1  # the 20-token prompt keeps everything


def test_budget_is_exact_per_request(batch_run):
    _, handle, inputs, outputs = batch_run
    method_budget = Budget(keep_fraction=0.4)
    for rid, prompt in zip(outputs, inputs):
        record = handle.compressor.records[rid]
        plan = plan_pages(len(prompt), PAGE, method_budget, WINDOW)
        assert record.plan == plan
        assert len(record.kept_pages) == plan.keep_pages
        assert len(record.freed_blocks) == plan.drop_pages
        assert len(record.kept_positions) == plan.stored_tokens
        assert record.kept_pages[-plan.tail_pages:] == list(range(plan.tail_start, plan.n_pages))


def test_pages_go_back_to_the_pool(batch_run):
    _, handle, inputs, _ = batch_run
    compressor = handle.compressor
    allocator = compressor.processor.cache.cache_allocators["full_attention"]
    assert not allocator.block_table  # everything freed at the end, nothing leaked
    peak = max(point.pages_in_use for point in compressor.timeline)
    uncompressed_total = sum(math.ceil((len(p) + NEW_TOKENS) / PAGE) for p in inputs)
    assert peak < uncompressed_total
    assert any(point.compressed_now for point in compressor.timeline)


def test_engine_keeps_the_pages_dense_scores_choose(batch_run):
    """The kept pages equal an offline selection from a dense forward of each prompt alone: scores were
    taken from the right slice of the packed batch, never from another request's queries or keys."""
    model, handle, inputs, outputs = batch_run
    settings = handle.settings
    for rid, prompt in zip(outputs, inputs):
        record = handle.compressor.records[rid]
        if not record.plan.compresses:
            continue
        scores = dense_window_scores(model, prompt, settings.window)
        pages = select_pages(scores, record.plan, settings.pooling, settings.kernel, settings.chunk_reduce).tolist()
        assert pages == record.kept_pages, rid


def test_score_from_zero_scores_with_every_layer():
    model = sharp_model()
    handle = serving.enable(model, chunkkv.ChunkKV(keep_fraction=0.3, window=WINDOW), page_size=PAGE, score_from=0.0)
    inputs = prompts((150, 211))
    out = model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config())
    s = handle.settings
    for rid, prompt in zip(out, inputs):
        record = handle.compressor.records[rid]
        scores = dense_window_scores(model, prompt, WINDOW, first_layer=0)
        assert record.kept_pages == select_pages(scores, record.plan, s.pooling, s.kernel, s.chunk_reduce).tolist()
    with pytest.raises(serving.ServingError, match="score_from"):
        serving.CompressionSettings(keep_fraction=0.2, score_from=1.0)


def test_original_positions_matter(batch_run):
    """Power check: decoding from the stored length instead of the prompt length changes the answer."""
    model, handle, inputs, outputs = batch_run
    differs = 0
    for (rid, out), prompt in zip(outputs.items(), inputs):
        record = handle.compressor.records[rid]
        if record.plan.compresses:
            wrong = serving.dense_greedy(model, prompt, record.kept_positions, NEW_TOKENS,
                                         first_position=record.plan.stored_tokens)
            differs += wrong != out.generated_tokens
    assert differs >= 2


def test_poisoned_pages_would_show(monkeypatch):
    """Power check for the NaN poison: a poisoned page that *is* read (here a kept one) ruins the answers,
    so the clean runs above prove no request ever read a dropped page or another request's page."""
    from chunkkv.serving import engine

    original = engine.PagedCompressor._compress

    def poison_a_kept_page(self, state, scores):
        done = original(self, state, scores)
        allocator = self.processor.cache.cache_allocators["full_attention"]
        allocator._copy_view[allocator.block_table[state.request_id][0]].fill_(255)
        return done

    monkeypatch.setattr(engine.PagedCompressor, "_compress", poison_a_kept_page)
    model, handle = compressed_model()
    inputs = prompts((150, 211))
    out = model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config())
    for (rid, result), prompt in zip(out.items(), inputs):
        reference = serving.dense_greedy(model, prompt, handle.compressor.records[rid].kept_positions, NEW_TOKENS)
        assert result.generated_tokens != reference


def test_observe_only_baseline_changes_nothing():
    """keep_fraction=1: the hooks trace and record but never score or drop; answers equal plain generate."""
    model = sharp_model()
    handle = serving.enable(model, chunkkv.ChunkKV(keep_fraction=1.0, window=WINDOW), page_size=PAGE, trace=True)
    inputs = prompts((150, 211))
    out = model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config())
    for (rid, result), prompt in zip(out.items(), inputs):
        record = handle.compressor.records[rid]
        assert not record.plan.compresses and record.kept_positions == list(range(len(prompt)))
        plain = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt):]
        assert result.generated_tokens == plain.tolist()
    assert handle.compressor.timeline and handle.compressor.restarts == 0


def test_split_prefill_shorter_than_the_window():
    """A prompt whose last prefill chunk is shorter than the window: the earlier chunks' last queries are kept."""
    model, handle = compressed_model(keep_fraction=0.3)
    max_batch = 64
    prompt = prompts((2 * max_batch + 3,))[0]  # chunks 64, 64, 3 (< window 8)
    out = model.generate_batch([prompt], generation_config=greedy(), continuous_batching_config=cb_config(64, max_batch))
    (rid, result), = out.items()
    record = handle.compressor.records[rid]
    assert record.plan.compresses
    scores = dense_window_scores(model, prompt, WINDOW)
    s = handle.settings
    assert record.kept_pages == select_pages(scores, record.plan, s.pooling, s.kernel, s.chunk_reduce).tolist()
    assert result.generated_tokens == serving.dense_greedy(model, prompt, record.kept_positions, NEW_TOKENS)


def test_a_request_arriving_while_others_decode():
    model, handle = compressed_model()
    first, late = prompts((150, 211, 100)), prompts((180,))[0]
    long_answer = 40
    results = {}
    with model.continuous_batching_context_manager(generation_config=greedy(long_answer),
                                                   continuous_batching_config=cb_config(), warmup=False) as manager:
        ids = [manager.add_request(p, max_new_tokens=long_answer, streaming=True) for p in first]
        seen = 0
        deadline = time.time() + 60
        while seen < 2 and time.time() < deadline:  # wait until the first requests decode
            out = manager.get_result(timeout=1)
            if out is not None and out.generated_tokens:
                seen = max(seen, len(out.generated_tokens))
        late_id = manager.add_request(late, max_new_tokens=NEW_TOKENS, streaming=False)
        while len(results) < 4 and time.time() < deadline:
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                results[out.request_id] = out
    assert set(results) == {*ids, late_id}
    records = handle.compressor.records
    assert records[late_id].decoding_alongside >= 1  # its prefill ran in a batch with decoding requests
    for rid, prompt, n in [*zip(ids, first, [long_answer] * 3), (late_id, late, NEW_TOKENS)]:
        assert results[rid].error is None
        reference = serving.dense_greedy(model, prompt, records[rid].kept_positions, n)
        assert results[rid].generated_tokens == reference, rid


def test_sdpa_and_eager_give_the_same_kept_pages():
    inputs = prompts((150, 211))
    kept = []
    for attn in ("sdpa", "eager"):
        model = sharp_model(attn=attn)
        handle = serving.enable(model, chunkkv.ChunkKV(keep_fraction=0.4, window=WINDOW), page_size=PAGE,
                                poison_freed=True)
        out = model.generate_batch(inputs, generation_config=greedy(), continuous_batching_config=cb_config())
        kept.append([handle.compressor.records[r].kept_pages for r in out])
        for (rid, res), prompt in zip(out.items(), inputs):
            assert res.generated_tokens == serving.dense_greedy(model, prompt, handle.compressor.records[rid].kept_positions,
                                                                NEW_TOKENS)
    assert kept[0] == kept[1]


def test_untagged_models_see_the_original_attention():
    install_tap()
    model = tiny_model()
    prompt = prompts((60,))[0]
    plain = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, 60:].tolist()
    assert plain == serving.dense_greedy(model, prompt, None, 6)


# --- refusals: one clear line each ----------------------------------------------------------------
def test_refuses_per_head_methods_and_boundary_chunks():
    with pytest.raises(serving.ServingError, match="ChunkKV"):
        serving.enable(tiny_model(), chunkkv.SnapKV(keep_fraction=0.2))
    with pytest.raises(serving.ServingError, match="a chunk is a page"):
        serving.enable(tiny_model(), chunkkv.ChunkKV(keep_fraction=0.2, boundary_ids={5}))


def test_refuses_sliding_window_models():
    with pytest.raises(serving.ServingError, match="full attention"):
        serving.enable(tiny_model("gemma3"), chunkkv.ChunkKV(keep_fraction=0.2))


def test_refuses_forked_sequences():
    model, _ = compressed_model()
    config = GenerationConfig(max_new_tokens=4, do_sample=True, num_return_sequences=2, eos_token_id=-1)
    with pytest.raises(serving.ServingError, match="num_return_sequences"):
        model.init_continuous_batching(generation_config=config)


def test_transformers_version_check(monkeypatch):
    monkeypatch.delenv("CHUNKKV_SERVE_ANY_TRANSFORMERS", raising=False)
    assert serving.check_transformers("5.25.0") == "5.25.0"
    with pytest.raises(serving.ServingError, match=r"tested with transformers >=5\.25,<5\.26, but 5\.24\.0"):
        serving.check_transformers("5.24.0")
    with pytest.raises(serving.ServingError, match="6.0.0"):
        serving.check_transformers("6.0.0")
    monkeypatch.setenv("CHUNKKV_SERVE_ANY_TRANSFORMERS", "1")
    assert serving.check_transformers("6.0.0") == "6.0.0"


def test_enable_forces_the_settings_compressed_requests_need():
    model, _ = compressed_model()
    manager = model.init_continuous_batching(
        continuous_batching_config=ContinuousBatchingConfig(page_size=256, allow_block_sharing=True, num_blocks=8))
    config = manager.continuous_batching_config
    assert config.page_size == PAGE and config.allow_block_sharing is False and config.use_async_batching is False
    serving.disable(model)
    assert "init_continuous_batching" not in vars(model)


# --- helpers ----------------------------------------------------------------------------------------
def dense_window_scores(model, prompt: list[int], window: int, first_layer: int | None = None) -> torch.Tensor:
    """Window attention scores of ``prompt`` alone, summed over the layers from ``first_layer`` (default: the
    deeper half, as the engine scores), from a plain forward."""
    total = {}
    if first_layer is None:
        first_layer = model.config.num_hidden_layers // 2

    def observe(module, query, key, kwargs):
        if module.layer_idx < first_layer:
            return
        scaling = kwargs.get("scaling") or module.scaling
        s = window_attention_scores(query[:, :, -window:], key, scaling)
        total["s"] = s if "s" not in total else total["s"] + s

    install_tap()
    tag_model(model, observe)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt]))
    finally:
        untag_model(model)
        handle = getattr(model, "_chunkkv_serving", None)
        if handle is not None and handle.compressors:  # put the engine's observer back
            tag_model(model, handle.compressor.scorer)
    return total["s"]


# --- chunkkv serve -----------------------------------------------------------------------------------
WORDS = ("the quick brown fox jumps over a lazy dog while seven silver lanterns glow above quiet harbor "
         "streets and old sailors tell stories about distant islands storms treasure maps and secret codes").split()


def save_chat_model(path: Path) -> Path:
    """A tiny random Llama with a word-level tokenizer and a chat template, saved as a HF folder."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "user:": 4, "assistant:": 5}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.1,
                                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cpu"):
        transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60):
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, json.load(response)


def test_chunkkv_serve_answers_concurrent_requests_and_stops_on_sigterm(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    needs_serve_extras()
    folder = save_chat_model(tmp_path / "chat-model")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(chunkkv.__file__).parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "chunkkv.cli", "serve", "--model", str(folder), "--keep-fraction", "0.25",
         "--window", "8", "--page-size", "16", "--num-blocks", "96", "--max-batch-tokens", "128", "--threads", "1",
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                assert http("GET", base + "/health", timeout=2) == (200, {"status": "ok"})
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, _read(log)
                time.sleep(0.5)

        def ask(n_words: int):
            text = " ".join(WORDS[i % len(WORDS)] for i in range(n_words))
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0}
            return http("POST", base + "/v1/chat/completions", body)

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, (90, 150, 230)))
        for status, reply in answers:
            assert status == 200 and reply["choices"][0]["message"]["role"] == "assistant"
            assert reply["usage"]["completion_tokens"] >= 1
        children = psutil.Process(server.pid).children(recursive=True)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        psutil.wait_procs(children, timeout=15)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = _read(log)
    assert len(re.findall(r"request \d+: prompt \d+ tokens, kept \d+ of \d+ pages", text)) == 3, text
    assert "chunkkv serve: stopped" in text


def _read(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()


@pytest.mark.parametrize("argv,phrase", [
    (["--method", "chunkkv"], "needs a budget"),
    (["--keep-fraction", "1.5"], "out of range"),
    (["--method", "full", "--keep-fraction", "0.2"], "keeps every token"),
    (["--keep-fraction", "0.2", "--page-size", "2"], "page-size"),
])
def test_chunkkv_serve_bad_flags_fail_in_one_line(capsys, argv, phrase):
    from chunkkv.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1 and "Traceback" not in err


def test_chunkkv_serve_refuses_an_untested_transformers(capsys, monkeypatch):
    import transformers

    from chunkkv.cli import main

    monkeypatch.delenv("CHUNKKV_SERVE_ANY_TRANSFORMERS", raising=False)
    monkeypatch.setattr(transformers, "__version__", "5.30.0")
    assert main(["serve", "--keep-fraction", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "tested with transformers >=5.25,<5.26, but 5.30.0" in err and err.count("\n") == 1
