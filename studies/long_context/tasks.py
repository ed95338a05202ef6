"""Long documents with several facts, asked completion-style: the tasks of the long-context study.

One *document* is about ``length`` tokens of the Paul Graham essays (the NIAH haystack) with seven
facts inserted at sentence ends, one per depth slot 0, 1/6, ... 1 (rotated with the document index,
so every fact kind visits every depth):

- the paper's NIAH needle ("The best thing to do in San Francisco is eat a sandwich and sit in
  Dolores Park on a sunny day.") -> task ``niah_paper``;
- two of the needles written for chunkkv (``studies.real_grid.tasks.NEEDLES``: the soup's secret
  ingredient, the boat's colour, the captain's dog, Emma's book, the library's best time) -> ``niah_nl``;
- four facts "<person>'s favorite <thing> is <word>." (four people, four kinds of thing), two of
  them asked, the other two distractors -> ``multikey``.

Five questions per document, each asked of the base model completion-style (no chat template)
with an answer prefix, as RULER and the NIAH scripts do::

    <bos><document>\\n\\nQuestion: What is Tom's favorite fruit?\\nAnswer: Tom's favorite fruit

The prefix stops one word short of the answer (``real_grid``'s prefixes without their last word:
"... fruit", not "... fruit is"). In the query-aware setting the question ends the compressed prompt
and every layer is pruned only after its own attention, so the first generated token comes from
the exact (full-cache) prefill whatever the method; with Gemma's 262k-token vocabulary every
multi-key value and several needle answers ("Biscuit", "yellow" after "bright") are one token, and
with the full prefix the answer would be that exact token for every method. Stopping one word
short makes the first token the prefix's own last word (" is", " painted") and the answer come
from the compressed cache.

The document's tokens are the same for every question (``context_ids``; the question's own tokens
``question_ids`` follow them exactly: the split is checked against tokenizing the whole prompt),
so one prefill of the document serves every question and every method.
Scoring is :func:`studies.real_grid.tasks.score_prediction` on the answer's first line: every
required answer string present (case-insensitive), and ROUGE-1 against the fact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from studies.real_grid.tasks import (FAVORITES, NEEDLES, PAPER_NEEDLE, PEOPLE, RealSample, _haystack, _insert,
                                     render, score_prediction)

__all__ = ["TASKS", "Document", "Question", "make_document", "score", "SLOTS"]

TASKS = ["niah_paper", "niah_nl", "multikey"]
#: depth slots of the seven facts (fraction of the essay text before the fact)
SLOTS = [k / 6 for k in range(7)]
#: new tokens decoded per task (the answers follow the prefix at once)
MAX_NEW = {"niah_paper": 16, "niah_nl": 14, "multikey": 6}


@dataclass
class Question:
    """One question about a document: ``answers`` must all appear in the first line generated."""

    task: str
    qid: int
    question: str
    prefix: str
    answers: list[str]
    reference: str
    depth: float
    question_ids: list[int] = field(default_factory=list)

    def sample(self, length: int, index: int) -> RealSample:
        """The question as a :class:`~studies.real_grid.tasks.RealSample` (for its scoring)."""
        return RealSample(self.task, length, index, "", self.question, self.answers, self.reference,
                          {"depth": self.depth}, self.prefix)


@dataclass
class Document:
    """A document of ``len(context_ids)`` tokens (``<bos>`` included) and its five questions."""

    length: int  # the nominal length (the prompt's token count is about this)
    index: int
    context: str
    context_ids: list[int]
    questions: list[Question]
    meta: dict[str, Any] = field(default_factory=dict)


def _shorter(prefix: str) -> str:
    """The answer prefix without its last word ("... soup is" -> "... soup"): the model's first token
    is then that word, not the answer (see the module docstring)."""
    return prefix.rsplit(" ", 1)[0]


def _facts(index: int, rng: random.Random) -> list[tuple[str, Question | None]]:
    """The seven facts in slot order k = 0..6 (k-th fact goes to slot ``(3k + index) % 7``), each
    with its question (None for a distractor)."""
    out: list[tuple[str, Question | None]] = []
    needle, question, answers, prefix = PAPER_NEEDLE
    out.append((needle, Question("niah_paper", 0, question, _shorter(prefix), answers, needle, 0.0)))
    for j in range(2):
        needle, question, answers, prefix = NEEDLES[(2 * index + j) % len(NEEDLES)]
        out.append((needle, Question("niah_nl", 1 + j, question, _shorter(prefix), answers, needle, 0.0)))
    people = rng.sample(PEOPLE, 4)
    cats = rng.sample(list(FAVORITES), 4)
    values = [rng.choice(FAVORITES[c]) for c in cats]
    for j, (p, c, v) in enumerate(zip(people, cats, values)):
        fact = f"{p}'s favorite {c} is {v}."
        asked = j < 2
        q = Question("multikey", 3 + j, f"What is {p}'s favorite {c}?", f"{p}'s favorite {c}", [v], fact, 0.0)
        out.append((fact, q if asked else None))
    return out


def _split(tokenizer, context: str, question: Question) -> tuple[list[int], list[int]]:
    """``(context_ids, question_ids)`` of the completion prompt; raises if tokenizing the whole
    prompt does not give exactly the two parts one after the other."""
    text = render(tokenizer, context, question.question, question.prefix, chat=False)
    head = render(tokenizer, context, "", "", chat=False)
    head = head[: head.rindex("\n\nQuestion:")]
    assert text.startswith(head)
    ctx = tokenizer(head, add_special_tokens=False)["input_ids"]
    q = tokenizer(text[len(head):], add_special_tokens=False)["input_ids"]
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    if whole != ctx + q:
        raise ValueError("the document and its question do not tokenize apart as they do together")
    return ctx, q


def make_document(tokenizer, length: int, index: int, seed: int = 0, question_room: int = 48) -> Document:
    """Document ``index`` of about ``length - question_room`` tokens (so the prompt with its question
    is about ``length``), deterministic in (length, index, seed); the essays start at a different
    essay for every document."""
    rng = random.Random(f"long_context/{length}/{seed}/{index}")
    start = rng.randrange(49)
    facts = _facts(index, rng)
    placed = []
    for k, (fact, q) in enumerate(facts):
        depth = SLOTS[(3 * k + index) % len(SLOTS)]
        placed.append((fact, depth, q))
        if q is not None:
            q.depth = depth
    target = length - question_room

    def build(n: int) -> str:
        text = _haystack(tokenizer, n, start)
        for fact, depth, _q in sorted(placed, key=lambda x: -x[1]):  # deepest first: shallower offsets hold
            text = _insert(text, fact, depth)
        return text

    n = target
    for _ in range(6):
        context = build(n)
        got = len(tokenizer(render(tokenizer, context, "", "", chat=False).rsplit("\n\nQuestion:", 1)[0],
                            add_special_tokens=False)["input_ids"])
        if abs(got - target) <= max(4, target // 200):
            break
        n = max(16, n + (target - got))
    questions = [q for _f, _d, q in placed if q is not None]
    questions.sort(key=lambda q: q.qid)
    context_ids: list[int] = []
    for q in questions:
        ctx, q.question_ids = _split(tokenizer, context, q)
        assert not context_ids or ctx == context_ids
        context_ids = ctx
    return Document(length, index, context, context_ids, questions,
                    {"start_essay": start, "facts": [(f, round(d, 3)) for f, d, _q in placed]})


def score(question: Question, prediction: str, length: int = 0, index: int = 0) -> dict[str, float]:
    """``{"score": 0/1, "rouge1": F}`` on the first line of the generation (a base model goes on
    after its answer with whatever it likes; the answer is the line after ``Answer:``)."""
    line = prediction.strip().split("\n", 1)[0] if prediction.strip() else ""
    return score_prediction(question.sample(length, index), line)
