"""chunkkv inside transformers' own APIs: the ``with chunkkv.compressing(model, method)`` block (stock
``model.generate`` and ``pipeline("text-generation")`` on a compressed cache) and the
``pipeline("chunkkv-text-generation")`` that compresses a context once and answers many questions."""

from __future__ import annotations

import copy

import pytest
import torch
from models import left_padded, random_prompt, tiny_model

import chunkkv
from chunkkv import ChunkKV, PyramidKV, SnapKV
from chunkkv.agnostic import agnostic_method
from chunkkv.errors import ChunkKVError, PromptError


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def testbed():
    """The shipped testbed model and its word-level tokenizer (a real tokenizer, 2 layers: fast)."""
    from chunkkv.cli_common import testbed_path

    model, tok = chunkkv.load_pretrained(str(testbed_path()), device="cpu")
    return model, tok


def _snapshot(model) -> dict:
    """Everything the block may touch: the attention implementation of every config, the whole
    config, and the instance's own attributes."""
    return {
        "configs": [copy.deepcopy(vars(m.config)) for m in model.modules() if hasattr(m, "config")],
        "impl": model.config._attn_implementation,
        "own": sorted(vars(model)),
        "generate": type(model).generate,
    }


def _by_hand(model, ids, mask, method, new, tokenizer=None, **kw):
    """What the block promises: compress all but the last prompt token, then stock generate."""
    ctx = chunkkv.compress(model, ids[:, :-1], None if mask is None else mask[:, :-1], method, tokenizer=tokenizer)
    out = model.generate(ids, attention_mask=mask, cache=ctx.cache, max_new_tokens=new, do_sample=False, **kw)
    chunkkv.detach(model)
    return out


@pytest.mark.parametrize("method", [ChunkKV(keep_fraction=0.2, window=8, reuse_depth=2),
                                    SnapKV(keep_tokens=20, window=8), PyramidKV(keep_fraction=0.3, window=8)],
                         ids=lambda m: m.name)
def test_with_block_padded_batch_same_tokens_as_compress_then_generate(llama, method):
    _, ids, mask = left_padded([100, 61, 83])
    before = _snapshot(llama)
    with chunkkv.compressing(llama, method) as run:
        got = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert _snapshot(llama) == before  # exactly as before: attention implementation, config, generate
    assert run.calls == 1 and run.stats.prompt_lengths == [99, 60, 82]
    assert torch.equal(got, _by_hand(llama, ids, mask, method, 8))
    stock = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert not torch.equal(stock, got)  # it did decode on another (the compressed) cache


def test_with_block_question_agnostic_default_same_tokens(testbed):
    """The question-agnostic default (hybrid scoring: a scoring pass with the tokenizer's
    instruction, sentence chunks) runs through the block as through ``compress``."""
    from chunkkv.synthetic import generate_samples

    model, tok = testbed
    method = agnostic_method(ChunkKV(keep_fraction=0.2), tokenizer=tok)
    assert method.scoring == "hybrid" and method.segmentation == "sentence"
    enc = tok([s.prompt for s in generate_samples("niah_single", 2, 300, seed=3)], return_tensors="pt", padding=True)
    assert not bool(enc["attention_mask"].all())  # a padded batch
    with chunkkv.compressing(model, method, tokenizer=tok) as run:
        got = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert run.stats.kept  # compressed
    want = _by_hand(model, enc["input_ids"], enc["attention_mask"], method, 6, tokenizer=tok)
    assert torch.equal(got, want)
    with pytest.raises(ChunkKVError, match="tokeni[sz]er"):  # the scoring pass needs the instruction's tokens
        with chunkkv.compressing(model, method):
            model.generate(**enc, max_new_tokens=2, do_sample=False)


def test_text_generation_pipeline_inside_the_block(testbed):
    from transformers import pipeline

    from chunkkv.synthetic import generate_samples

    model, tok = testbed
    prompts = [s.prompt for s in generate_samples("niah_multikey", 2, 400, seed=1)]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    method = ChunkKV(keep_fraction=0.1)
    kw = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    with chunkkv.compressing(model, method) as run:
        inside = [o[0]["generated_text"] for o in pipe(prompts, batch_size=2, **kw)]
    assert run.calls == 1 and len(run.stats.prompt_lengths) == 2  # one padded batch
    enc = tok(prompts, return_tensors="pt", padding=True)
    want = _by_hand(model, enc["input_ids"], enc["attention_mask"], method, 6)
    texts = [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in want]
    assert [t.strip() for t in inside] == [t.strip() for t in texts]
    outside = [o[0]["generated_text"] for o in pipe(prompts, batch_size=2, **kw)]
    assert outside != inside  # after the block the pipeline runs on the full cache again


def test_the_model_is_exactly_as_before_after_errors_nesting_and_an_earlier_attach(llama):
    ids = random_prompt(1, 60)
    before = _snapshot(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with chunkkv.compressing(llama, ChunkKV(keep_tokens=20, window=8)):
            llama.generate(ids, max_new_tokens=2, do_sample=False)
            raise RuntimeError("boom")
    assert _snapshot(llama) == before
    outer, inner = ChunkKV(keep_tokens=30, window=8), SnapKV(keep_tokens=12, window=8)
    with chunkkv.compressing(llama, outer) as a:
        with chunkkv.compressing(llama, inner) as b:
            llama.generate(ids, max_new_tokens=2, do_sample=False)
        assert (a.calls, b.calls) == (0, 1) and b.stats.kept[0] == [12]  # the innermost method compresses
        llama.generate(ids, max_new_tokens=2, do_sample=False)
        assert a.calls == 1 and a.stats.kept[0] == [30]
    assert _snapshot(llama) == before
    chunkkv.attach(llama)  # attached before the block: still attached after it
    try:
        attached = _snapshot(llama)
        with chunkkv.compressing(llama, outer):
            llama.generate(ids, max_new_tokens=2, do_sample=False)
        assert _snapshot(llama) == attached
    finally:
        chunkkv.detach(llama)


def test_with_block_leaves_calls_with_their_own_cache_and_refuses_what_it_cannot_compress(llama):
    ids = random_prompt(1, 60)
    method = ChunkKV(keep_tokens=20, window=8)
    ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=30, window=8))
    own = llama.generate(torch.cat([ids, ids[:, :3]], 1), cache=ctx.cache, max_new_tokens=4, do_sample=False)
    with chunkkv.compressing(llama, method) as run:
        again = llama.generate(torch.cat([ids, ids[:, :3]], 1), cache=ctx.cache, max_new_tokens=4, do_sample=False)
        assert run.calls == 0 and torch.equal(own, again)
        _, pids, pmask = left_padded([50, 40])
        right = torch.flip(pmask, [1])
        with pytest.raises(PromptError, match="left"):
            llama.generate(pids, attention_mask=right, max_new_tokens=2)
        with pytest.raises(ChunkKVError, match="inputs_embeds"):
            llama.generate(inputs_embeds=llama.get_input_embeddings()(ids), max_new_tokens=2)
        with pytest.raises(PromptError, match="window"):  # a prompt the window covers: compress's own error
            llama.generate(ids[:, :5], max_new_tokens=2)
    chunkkv.detach(llama)


def test_with_block_several_sequences_per_prompt(llama):
    """``num_return_sequences`` / ``num_beams`` expand the prompt rows; the block expands the cache to match."""
    _, ids, mask = left_padded([70, 55])
    method = ChunkKV(keep_fraction=0.3, window=8)
    with chunkkv.compressing(llama, method):
        beams = llama.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=2, num_return_sequences=2,
                               do_sample=False)
    ctx = chunkkv.compress(llama, ids[:, :-1], mask[:, :-1], method)
    cache = ctx.cache
    cache.batch_repeat_interleave(2)
    want = llama.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=5, num_beams=2,
                          num_return_sequences=2, do_sample=False)
    chunkkv.detach(llama)
    assert beams.shape[0] == 4 and torch.equal(beams, want)


# --- pipeline("chunkkv-text-generation") ----------------------------------------------------------
@pytest.fixture(scope="module")
def qa(testbed):
    from transformers import pipeline

    from chunkkv.synthetic import generate_samples

    model, tok = testbed
    assert chunkkv.register_pipeline() == "chunkkv-text-generation"
    sample = generate_samples("niah_multikey", 1, 500, seed=2)[0]
    pairs = [n.removeprefix("the special code for ").removesuffix(" .").split(" is ") for n in sample.meta["needles"]]
    questions = [f"question : what is the special code for {k} ? answer : {k} is" for k, _ in pairs[:3]]
    return pipeline("chunkkv-text-generation", model=model, tokenizer=tok), sample.context, questions, pairs


def test_pipeline_compresses_once_and_answers_every_question_as_generate_does(qa, testbed):
    model, tok = testbed
    pipe, context, questions, pairs = qa
    method = ChunkKV(keep_fraction=0.3)
    got = pipe(context, questions=questions, method=method, max_new_tokens=5)
    want = chunkkv.generate(model, tok, context, questions, method,
                            sampling=chunkkv.Sampling(max_new_tokens=5))
    assert got == {"answers": [a.texts[0] for a in want.answers]}
    chunkkv.detach(model)
    pipe(context, question=questions[0], method=method, max_new_tokens=2)
    assert model.config._attn_implementation == "sdpa"  # the call leaves the model as it was
    assert want.context.method.scoring == "hybrid"  # the question-agnostic default ran
    one = pipe(context, question=questions[0], method=method, max_new_tokens=5)
    assert one == {"answer": got["answers"][0]}
    full = pipe(context, questions=questions, method="full", max_new_tokens=5)
    assert [a.removesuffix(" .") for a in full["answers"]] == [v for _, v in pairs[:3]]  # the full cache answers


def test_pipeline_query_aware_and_answer_prefix(qa, testbed):
    model, tok = testbed
    pipe, context, questions, pairs = qa
    method = ChunkKV(keep_fraction=0.2)
    aware = pipe(context, questions=questions[:2], method=method, query_aware=True,
                 max_new_tokens=4)
    want = [chunkkv.generate(model, tok, context, q, method, query_aware=True,
                             sampling=chunkkv.Sampling(max_new_tokens=4)).answers[0].texts[0] for q in questions[:2]]
    assert aware == {"answers": want}
    head, _, tail = questions[0].rpartition(" answer :")
    prefixed = pipe(context, question=head, answer_prefix=" answer :" + tail, method="full",
                    max_new_tokens=4)
    whole = pipe(context, question=questions[0], method="full", max_new_tokens=4)
    assert prefixed == whole  # the prefix is fed after the question, and not returned


def test_pipeline_default_method_and_errors(qa):
    from chunkkv.hf_pipeline import _method, default_method

    pipe, context, questions, pairs = qa
    assert default_method() == ChunkKV(keep_fraction=0.1)  # the library's one default budget
    assert _method("snapkv") == SnapKV(keep_fraction=0.1) and _method("full").name == "full"
    with pytest.raises(ChunkKVError, match="question="):
        pipe(context)
    with pytest.raises(ChunkKVError, match="unknown option"):
        pipe(context, question=questions[0], press="x")
    with pytest.raises(ChunkKVError, match="non-empty"):
        pipe("  ", question=questions[0])
