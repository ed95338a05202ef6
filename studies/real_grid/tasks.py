"""Long-context tasks in natural language that a small real model (SmolLM2-135M-Instruct) solves
with the full cache: the quality harness of ``studies/real_grid/README.md``.

Every sample is a chat prompt ``user: <context>\\n\\n<question>`` rendered with the tokenizer's chat
template (generation prompt added). The context is Paul Graham's essays (the original NIAH
haystack, :mod:`chunkkv.haystack`) with facts inserted at sentence ends, or, for ``icl``, labelled
examples. Tasks (``REAL_TASKS``):

- ``niah_paper``  the NIAH needle of the paper ("... eat a sandwich and sit in Dolores Park ...");
- ``niah_nl``     one of several natural-language needles written for chunkkv (``NEEDLES``);
- ``niah_number`` a needle whose answer is a number of 4–7 digits (``NUMBER_NEEDLES``), which a
                  tokenizer that writes numbers digit by digit (SmolLM2) cuts into one token per digit;
- ``multikey``    four facts "<person>'s favorite <thing> is <word>." (four people, four kinds of
                  thing), one asked for; the other three are distractors;
- ``vt``          variable tracking in words: a number given to one person, then passed on over
                  two hops ("Anna has the same number as Tom."), the last holder's number asked;
- ``icl``         in-context learning (a stand-in for many-shot GSM8K): ``k`` labelled examples
                  (words labelled by their category with arbitrary direction words) fill the
                  context; the question asks the label of a new word.

The assistant's reply starts with an answer prefix that is part of the prompt ("The best thing to
do in San Francisco is"), as RULER and the NIAH scripts do, so the answer comes first and decoding
is short. Scoring: ``score`` is 1 when every required answer string appears in the generated text
(case insensitive; for ``niah_number`` the number must stand whole, no digit before or after it); ``rouge1`` is ROUGE-1 F of prefix + generation against the reference sentence
where the task has one.
Lengths are whole-prompt token counts (template included), matched to within about a sentence.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from chunkkv.errors import ChunkKVError

__all__ = ["REAL_TASKS", "NEEDLES", "RealSample", "make_samples", "score_prediction", "context_split"]

REAL_TASKS = ["niah_paper", "niah_nl", "niah_number", "multikey", "vt", "icl"]

PAPER_NEEDLE = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
                "What is the best thing to do in San Francisco?", ["sandwich", "Dolores Park"],
                "The best thing to do in San Francisco is")

#: (needle, question, answers that must all appear, answer prefix)
NEEDLES = [
    ("The secret ingredient in Aunt Maria's tomato soup is smoked paprika.",
     "What is the secret ingredient in Aunt Maria's tomato soup?", ["paprika"],
     "The secret ingredient in Aunt Maria's tomato soup is"),
    ("The small boat in the harbor at Lisbon is painted bright yellow.",
     "What color is the small boat in the harbor at Lisbon?", ["yellow"],
     "The small boat in the harbor at Lisbon is painted"),
    ("The name of the captain's dog on the ferry to Vancouver is Biscuit.",
     "What is the name of the captain's dog on the ferry to Vancouver?", ["Biscuit"],
     "The name of the captain's dog on the ferry to Vancouver is"),
    ("Emma's favorite childhood book was a story about a fox who learned to play the violin.",
     "What was Emma's favorite childhood book about?", ["fox", "violin"],
     "Emma's favorite childhood book was a story about"),
    ("The best time to visit the old library in Prague is on a rainy Tuesday morning.",
     "When is the best time to visit the old library in Prague?", ["Tuesday"],
     "The best time to visit the old library in Prague is"),
]

#: (needle with {n}, question, answer prefix): the number is drawn per sample (4 to 7 digits)
NUMBER_NEEDLES = [
    ("The winning lottery number in Dunmore last spring was {n}.",
     "What was the winning lottery number in Dunmore last spring?", "The winning lottery number in Dunmore last spring was"),
    ("The code to open the red safe in the museum basement is {n}.",
     "What is the code to open the red safe in the museum basement?", "The code to open the red safe in the museum basement is"),
    ("The old lighthouse on Mercer Point was repainted by {n} volunteers.",
     "How many volunteers repainted the old lighthouse on Mercer Point?", "The old lighthouse on Mercer Point was repainted by"),
    ("The membership number of the chess club's founder is {n}.",
     "What is the membership number of the chess club's founder?", "The membership number of the chess club's founder is"),
]

FAVORITES = {
    "fruit": ["mango", "peach", "cherry", "apricot", "plum"],
    "color": ["purple", "orange", "turquoise", "crimson", "silver"],
    "animal": ["otter", "giraffe", "penguin", "dolphin", "hedgehog"],
    "city": ["Lisbon", "Vienna", "Kyoto", "Oslo", "Dublin"],
    "flower": ["tulip", "daisy", "lavender", "orchid", "sunflower"],
    "sport": ["tennis", "rowing", "fencing", "cycling", "volleyball"],
}
PEOPLE = ["Tom", "Anna", "Lucas", "Maya", "Oscar", "Nina", "Henry", "Clara", "Felix", "Iris"]
ICL_CLASSES = {
    "north": ["dog", "cat", "horse", "rabbit", "tiger", "sheep", "wolf", "mouse", "eagle", "frog", "lion", "goat"],
    "south": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon", "orange", "kiwi"],
    "east": ["car", "bus", "train", "truck", "bicycle", "boat", "plane", "tractor", "scooter", "taxi", "van", "ship"],
    "west": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello", "banjo", "organ", "clarinet",
             "saxophone"],
}
INSTRUCTION = "Answer the question about the text above in one short sentence."


@dataclass
class RealSample:
    """One prompt: ``context`` then ``question`` in one user message; ``answers`` must all appear."""

    task: str
    length: int
    index: int
    context: str
    question: str
    answers: list[str]
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # the start of the assistant's answer, part of the prompt (as RULER's answer prefixes)


def _sentence_ends(text: str) -> list[int]:
    """Character offsets right after each sentence end (``. `` / ``? `` / ``! `` or a blank line)."""
    return [m.end() for m in re.finditer(r"(?<=[.!?])\s+|\n\n", text)]


def _insert(text: str, fact: str, depth: float) -> str:
    """``fact`` inserted at the sentence end closest below ``depth`` (0..1) of ``text``."""
    ends = [0] + _sentence_ends(text)
    target = depth * len(text)
    pos = max(e for e in ends if e <= max(target, 0))
    if depth >= 1.0:
        return text.rstrip() + " " + fact
    return text[:pos] + fact + " " + text[pos:]


def _haystack(tokenizer, n_tokens: int, start: int) -> str:
    """About ``n_tokens`` tokens of the essays from essay ``start``, cut at a sentence end."""
    from chunkkv.haystack import paul_graham_text

    text = paul_graham_text(min_chars=6 * n_tokens + 2000, start=start)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(n_tokens, 1)]
    cut = tokenizer.decode(ids)
    ends = _sentence_ends(cut)
    return cut[: ends[-1]].rstrip() if ends else cut


def render(tokenizer, context: str, question: str, prefix: str = "", chat: bool = True) -> str:
    """The chat prompt text for ``context`` followed by ``question`` in one user message, the
    generation prompt, and the answer ``prefix`` the assistant's reply starts with.

    ``chat=False``: the completion-style prompt a base model (no chat template) is asked with,
    ``"<bos>context\n\nQuestion: question\nAnswer: prefix"`` (the BOS token's text first when the
    tokenizer adds one by itself, so tokenizing without special tokens gives it).
    """
    if not chat:
        plain = tokenizer("", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token if plain and plain[0] == tokenizer.bos_token_id and tokenizer.bos_token else ""
        return f"{bos}{context}\n\nQuestion: {question}\nAnswer: {prefix}".rstrip(" ")
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix


def context_split(tokenizer, sample: RealSample) -> tuple[list[int], list[int]]:
    """``(context_ids, question_ids)``: the prompt's tokens cut where the question starts.

    The rendered prompt is tokenized once; the cut is the first token whose text starts at or after
    the question's character offset, so ``context_ids + question_ids`` is exactly the prompt.
    """
    text = render(tokenizer, sample.context, sample.question, sample.prefix)
    start = text.rindex(sample.question)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    cut = next(i for i, (s, _e) in enumerate(enc["offset_mapping"]) if s >= start - 2)
    return ids[:cut], ids[cut:]


def _fit(tokenizer, build, length: int, prefix: str = "") -> tuple[str, str]:
    """Grow/shrink the haystack given to ``build(n) -> (context, question)`` until the rendered
    prompt is ``length`` tokens within 1 %, for at most 6 tries (the last is kept). The haystack
    is cut at sentence ends, so prompts land within about a sentence (a few %) of ``length``."""
    n = length
    for _ in range(6):
        context, question = build(n)
        got = len(tokenizer(render(tokenizer, context, question, prefix), add_special_tokens=False)["input_ids"])
        if abs(got - length) <= max(4, length // 100):
            break
        n = max(16, n + (length - got))
    return context, question


def make_samples(tokenizer, task: str, length: int, n: int, seed: int = 0) -> list[RealSample]:
    """``n`` samples of ``task`` at ``length`` prompt tokens (deterministic in ``seed``).

    Depths cycle through 0, 25, 50, 75 and 100 % of the context (needle tasks); essays start at a
    different essay for every sample.
    """
    if task not in REAL_TASKS:
        raise ChunkKVError(f"unknown task {task!r}; choose from {', '.join(REAL_TASKS)}")
    out = []
    for i in range(n):
        rng = random.Random(f"{task}/{length}/{seed}/{i}")
        depth = [0.0, 0.25, 0.5, 0.75, 1.0][i % 5]
        start = rng.randrange(49)
        if task in ("niah_paper", "niah_nl"):
            needle, question, answers, prefix = PAPER_NEEDLE if task == "niah_paper" else NEEDLES[i % len(NEEDLES)]

            def build(k, needle=needle, question=question, start=start, depth=depth):
                return _insert(_haystack(tokenizer, k, start), needle, depth), f"{question} {INSTRUCTION}"

            context, q = _fit(tokenizer, build, length, prefix)
            out.append(RealSample(task, length, i, context, q, answers, needle, {"depth": depth, "needle": needle},
                                  prefix))
        elif task == "niah_number":
            template, question, prefix = NUMBER_NEEDLES[i % len(NUMBER_NEEDLES)]
            number = str(rng.randrange(10 ** (3 + i % 4), 10 ** (4 + i % 4)))  # 4, 5, 6, 7 digits in turn
            needle = template.format(n=number)

            def build(k, needle=needle, question=question, start=start, depth=depth):
                return _insert(_haystack(tokenizer, k, start), needle, depth), f"{question} {INSTRUCTION}"

            context, q = _fit(tokenizer, build, length, prefix)
            out.append(RealSample(task, length, i, context, q, [number], needle,
                                  {"depth": depth, "needle": needle, "number": number}, prefix))
        elif task == "multikey":
            people = rng.sample(PEOPLE, 4)
            cats = rng.sample(list(FAVORITES), 4)
            values = [rng.choice(FAVORITES[c]) for c in cats]
            facts = [f"{p}'s favorite {c} is {v}." for p, c, v in zip(people, cats, values)]
            asked = rng.randrange(4)
            depths = sorted(rng.random() for _ in range(4))
            depths[asked] = depth

            def build(k, facts=facts, depths=depths, start=start, who=people[asked], what=cats[asked]):
                text = _haystack(tokenizer, k, start)
                for f, d in sorted(zip(facts, depths), key=lambda x: -x[1]):
                    text = _insert(text, f, d)
                return text, f"What is {who}'s favorite {what}? {INSTRUCTION}"

            prefix = f"{people[asked]}'s favorite {cats[asked]} is"
            context, q = _fit(tokenizer, build, length, prefix)
            out.append(RealSample(task, length, i, context, q, [values[asked]], facts[asked],
                                  {"depth": depth, "facts": facts, "asked": asked}, prefix))
        elif task == "vt":
            a, b, c = rng.sample(PEOPLE, 3)
            number = str(rng.randrange(1000, 10000))
            facts = [f"{a}'s number is {number}.", f"{b} has the same number as {a}.", f"{c} has the same number as {b}."]
            depths = [depth * 0.6, depth * 0.6 + 0.2, depth * 0.6 + 0.4]

            def build(k, facts=facts, depths=depths, start=start, c=c):
                text = _haystack(tokenizer, k, start)
                for f, d in sorted(zip(facts, depths), key=lambda x: -x[1]):
                    text = _insert(text, f, d)
                return text, f"What is {c}'s number? {INSTRUCTION}"

            context, q = _fit(tokenizer, build, length, f"{c}'s number is")
            out.append(RealSample(task, length, i, context, q, [number], f"{c}'s number is {number}.",
                                  {"depth": depth, "people": [a, b, c]}, f"{c}'s number is"))
        else:  # icl
            labels = list(ICL_CLASSES)
            pool = [(w, lab) for lab in labels for w in ICL_CLASSES[lab]]
            query_word, query_label = pool[rng.randrange(len(pool))]
            shots = [p for p in pool if p[0] != query_word]

            def build(k, shots=shots, rng_seed=f"{seed}/{i}", query_word=query_word):
                r = random.Random(rng_seed)
                lines, total = [], 0
                while total < k:  # ~6 tokens per example line
                    w, lab = shots[r.randrange(len(shots))]
                    lines.append(f"Word: {w}\nLabel: {lab}")
                    total += 7
                ctx = "Each word below is labelled north, south, east or west.\n\n" + "\n\n".join(lines)
                return ctx, (f"Following the examples above, what is the label of the word {query_word}? "
                             "Answer with one word: north, south, east or west.")

            prefix = f"The label of the word {query_word} is"
            context, q = _fit(tokenizer, build, length, prefix)
            out.append(RealSample(task, length, i, context, q, [query_label], None,
                                  {"word": query_word, "labels": labels}, prefix))
    return out


def score_prediction(sample: RealSample, prediction: str) -> dict[str, float]:
    """``{"score": 0/1, "rouge1": F}``: every answer present (case-insensitive); for ``icl`` the
    prediction must name the right label and no other. ROUGE-1 against the reference sentence."""
    text = prediction.lower()
    if sample.task == "niah_number":  # the number whole: no digit may come right before or after it
        hit = all(re.search(rf"(?<!\d){re.escape(a)}(?!\d)", text) for a in sample.answers)
    else:
        hit = all(a.lower() in text for a in sample.answers)
    if sample.task == "icl":
        others = [lab for lab in sample.meta["labels"] if lab not in sample.answers]
        hit = hit and not any(re.search(rf"\b{o}\b", text) for o in others)
    out = {"score": float(hit)}
    if sample.reference:
        from chunkkv.evaluation.metrics import rouge1_score

        out["rouge1"] = float(rouge1_score(f"{sample.prefix} {prediction}".strip(), sample.reference))
    return out
