"""Tests of the synthetic RULER-style suite (pure Python; no model needed)."""

from __future__ import annotations

import pytest

from chunkkv.synthetic import HAYSTACKS, TASKS, Sample, generate_samples, score_sample, score_samples
from chunkkv.synthetic import SYLLABLES, vocabulary_words


class CharTokenizer:
    """A stand-in "any tokenizer": one token per UTF-8 byte."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


@pytest.fixture(scope="module")
def testbed_tokenizer():
    from chunkkv.testbed.tokenizer import build_hf_tokenizer

    return build_hf_tokenizer()


def _key(s: Sample):
    return (s.task, s.context, s.question, tuple(s.answers), repr(sorted(s.meta.items())))


def test_tasks_listed():
    assert TASKS == ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"]
    assert set(HAYSTACKS) == {"varied", "repetitive"}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_deterministic(task, haystack):
    a = generate_samples(task, 3, 600, seed=11, haystack=haystack)
    b = generate_samples(task, 3, 600, seed=11, haystack=haystack)
    c = generate_samples(task, 3, 600, seed=12, haystack=haystack)
    assert [_key(s) for s in a] == [_key(s) for s in b]
    assert all(_key(x) != _key(y) for x, y in zip(a, c))
    # Samples within one call differ from each other too.
    assert len({s.context for s in a}) == 3


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 1024, 4096, 8192])
def test_length_near_target_testbed_tokenizer(task, length, testbed_tokenizer):
    for s in generate_samples(task, 2, length, seed=5, tokenizer=testbed_tokenizer):
        n = len(testbed_tokenizer(s.prompt, add_special_tokens=False).input_ids)
        assert n == s.meta["length"]
        # Haystacks are filled sentence by sentence, never past the target.
        assert length - 16 <= n <= length


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_length_with_any_tokenizer(haystack):
    tok = CharTokenizer()
    for s in generate_samples("niah_multikey", 2, 3000, seed=2, tokenizer=tok, haystack=haystack):
        n = len(tok.encode(s.prompt))
        assert n == s.meta["length"]
        assert 3000 - 120 <= n <= 3000  # within one sentence (~40 characters)


def test_without_tokenizer_counts_words():
    s = generate_samples("niah_single", 1, 700, seed=0)[0]
    assert s.meta["length"] == len(s.prompt.split())
    assert 680 <= s.meta["length"] <= 700


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_gold_in_context_and_question_last(task, haystack):
    for s in generate_samples(task, 4, 1024, seed=3, haystack=haystack):
        assert s.answers
        for a in s.answers:
            assert f" {a} " in f" {s.context} "
        for needle in s.meta["needles"]:
            assert needle in s.context
        # The question comes after the context and ends with the answer prefix.
        assert s.prompt.endswith(s.question)
        assert s.question.startswith("question :")
        # Every gold string is in the canonical target completion.
        assert score_sample(s.meta["target"], s.answers) == 1.0


def test_multi_token_values_and_unique_syllables():
    syl = set(SYLLABLES)
    for s in generate_samples("niah_multiquery", 5, 1024, seed=9):
        for a in s.answers:
            words = a.split()
            assert len(words) >= 3 and all(w in syl for w in words)
        # No syllable is used twice among the needles of one sample.
        needle_syl = [w for n in s.meta["needles"] for w in n.split() if w in syl]
        assert len(needle_syl) == len(set(needle_syl))


@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 90, 100])
@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_needle_at_requested_depth(depth, haystack):
    for s in generate_samples("niah_single", 3, 2048, seed=4, depth=depth, haystack=haystack):
        needle = s.meta["needles"][0]
        words = s.context.split()
        start = s.context.index(needle)
        before = len(s.context[:start].split())
        haystack_words = len(words) - len(needle.split())
        realised = 100 * before / haystack_words
        assert abs(realised - depth) <= 2.0, (realised, depth)
        assert abs(s.meta["needle_depths"][0] - realised) <= 0.5


def test_depth_places_queried_needle_in_multikey():
    for s in generate_samples("niah_multikey", 3, 2048, seed=8, depth=30):
        q = s.meta["queried_needles"][0]
        assert abs(s.meta["needle_depths"][q] - 30) <= 2.0
        assert s.answers[0] in s.meta["needles"][q]


def test_task_options():
    s = generate_samples("niah_multikey", 1, 1024, seed=0, num_keys=8)[0]
    assert len(s.meta["needles"]) == 8
    s = generate_samples("niah_multivalue", 1, 1024, seed=0, num_values=6)[0]
    assert len(s.answers) == 6
    s = generate_samples("vt", 1, 1024, seed=0, num_hops=6, num_chains=2)[0]
    assert len(s.answers) == 7 and len(s.meta["needles"]) == 14
    with pytest.raises(ValueError):
        generate_samples("niah_single", 1, 1024, num_keys=3)
    with pytest.raises(ValueError):
        generate_samples("nope", 1, 1024)
    with pytest.raises(ValueError):
        generate_samples("niah_single", 1, 1024, haystack="essays")
    with pytest.raises(ValueError):
        generate_samples("niah_single", 1, 1024, depth=120)


def test_vocabulary_covers_suite(testbed_tokenizer):
    vocab = set(vocabulary_words())
    for task in TASKS:
        for hay in HAYSTACKS:
            s = generate_samples(task, 2, 512, seed=1, haystack=hay)[0]
            assert set(s.prompt.split()) <= vocab
            assert set(s.meta["target"].split()) <= vocab
    ids = testbed_tokenizer(s.prompt).input_ids
    assert testbed_tokenizer.unk_token_id not in ids


def test_score_sample_hand_checked():
    gold = ["vak mor tel sun", "zan pol"]
    assert score_sample("vak mor tel sun . zan pol", gold) == 1.0
    assert score_sample("the answer is vak mor tel sun", gold) == 0.5
    assert score_sample("vak mor tel", gold) == 0.0  # a fragment of the value is not the value
    assert score_sample("VAK  Mor\ntel sun", gold) == 0.5  # case and whitespace normalised
    assert score_sample("", gold) == 0.0
    assert score_sample("a b c", ["a", "b", "c", "d"]) == 0.75
    with pytest.raises(ValueError):
        score_sample("x", [])


def test_score_samples_mean():
    samples = generate_samples("niah_single", 2, 256, seed=0)
    preds = [samples[0].answers[0], "nothing"]
    assert score_samples(preds, samples) == 0.5
