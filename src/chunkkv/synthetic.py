"""RULER-style synthetic long-context tasks, generated locally (no downloads).

Every sample is a long *context* (a haystack with needles hidden in it) followed by a short
*question* that ends with an answer prefix, so a causal LM continues it with the answer. The
question always comes **after** the context: KV-cache compression methods that score context
tokens from the attention of the last prompt tokens (the question region) can then be compared
on whether they keep the needles the question needs.

Keys, values and variable names are made of pseudo-word syllables ("zan pol", "vak mor tel
sun"). A value is several tokens long on purpose: token-level eviction can keep the first token
of an answer and drop the rest, chunk-level eviction (ChunkKV) keeps it whole.

Tasks (``TASKS``):

- ``niah_single``     one needle, one query, the answer is a multi-token (4 syllable) value;
- ``niah_multikey``   one queried needle among distractor needles with other keys;
- ``niah_multivalue`` one key with several (numbered) values, all must be listed;
- ``niah_multiquery`` several needles, all queried in one question;

Multi-value and multi-query questions spell out the slots to fill (``k is ? . k' is ? .``) so
the answer walks a list instead of remembering what it has listed already.
- ``vt``              variable tracking: a chain of assignments ``var b = var a`` (several hops),
  list every variable that holds the root value.

Haystacks: ``"varied"`` (grammar-generated natural-looking sentences, no two alike) and
``"repetitive"`` (RULER's "the grass is green. the sky is blue. ..." loop).

Length is measured in tokens of the tokenizer passed in (the full prompt ``context + " " +
question`` without special tokens); with ``tokenizer=None`` it is measured in whitespace words,
which is exactly the token count of the word-level testbed tokenizer.

Scoring follows RULER's ``string_match_all``: the fraction of gold strings found
(case-insensitively) in the prediction.

This module is pure Python: it imports neither torch nor transformers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .errors import ChunkKVError

__all__ = [
    "TASKS",
    "HAYSTACKS",
    "Sample",
    "Episode",
    "generate_samples",
    "build_episode",
    "score_sample",
    "score_samples",
    "vocabulary_words",
    "SYLLABLES",
]

TASKS: list[str] = [
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
]
HAYSTACKS: tuple[str, ...] = ("varied", "repetitive")

# --------------------------------------------------------------------------------------------
# Word lists. Everything is lower case and space-separated from punctuation so that a word-level
# tokenizer covers the whole suite with a small vocabulary.
# --------------------------------------------------------------------------------------------

PUNCT: tuple[str, ...] = (".", ",", "?", ":", "=")

# Words used by needles, questions and answers. The distinctive ones (special, code, var, ...)
# never appear in the haystacks; function words (the, and, is) do.
TEMPLATE_WORDS: tuple[str, ...] = (
    "question", "answer", "what", "is", "are", "all", "the", "special", "code", "codes",
    "for", "number", "fill", "in", "and", "find", "variables", "that", "assigned", "value", "they",
    "var",
)
# Ordinals that tell the values of one key apart in niah_multivalue (never used in haystacks).
ORDINALS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight")

# RULER's repetitive noise, lower-cased and tokenized.
REPETITIVE_TEXT: str = (
    "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again ."
)

_NOUNS = (
    "farmer", "river", "stone", "village", "teacher", "garden", "window", "letter", "boat",
    "mountain", "forest", "road", "bridge", "market", "child", "doctor", "horse", "dog", "cat",
    "bird", "tree", "house", "door", "book", "table", "chair", "lamp", "city", "king", "queen",
    "soldier", "sailor", "painter", "singer", "baker", "hunter", "wolf", "fox", "bear", "ship",
    "island", "valley", "castle", "tower", "field", "wall", "lake", "cloud", "storm", "wind",
    "fire", "candle", "basket", "coat", "hat", "shoe", "song", "story", "map", "key", "box",
    "clock", "train", "station", "school", "library", "kitchen", "bottle", "apple", "bread",
    "cheese", "coin", "ring", "sword", "shield", "flag", "drum", "bell", "rope", "wheel",
    "cart", "mill", "well", "path", "hill", "shore", "harbor", "engine", "machine", "student",
    "merchant", "friend", "brother", "sister", "mother", "father", "neighbor", "stranger",
    "guard", "priest", "judge", "poet", "miner", "fisher",
)
_PLACES = (
    "river", "village", "market", "forest", "mountain", "harbor", "castle", "station",
    "library", "kitchen", "garden", "valley", "island", "city", "school", "field", "shore",
    "bridge", "mill", "tower",
)
_ADJS = (
    "old", "young", "small", "large", "quiet", "loud", "bright", "dark", "warm", "cold",
    "green", "red", "blue", "brown", "white", "black", "happy", "sad", "tired", "busy",
    "strange", "famous", "empty", "heavy", "light", "narrow", "wide", "gentle", "wild",
    "clever", "brave", "careful", "ancient", "simple", "golden", "silver", "wooden", "hidden",
    "distant", "early", "late", "soft", "rough", "sharp", "calm", "proud", "poor", "rich",
)
_VERBS = (
    "walked", "looked", "waited", "rested", "worked", "stayed", "listened", "smiled",
    "laughed", "traveled", "returned", "arrived", "danced", "sang", "slept", "ran", "sat",
    "stood", "paused", "wandered", "climbed", "moved", "turned", "watched", "called",
    "followed", "searched", "rode", "sailed", "hurried",
)
_TVERBS = (
    "found", "carried", "built", "painted", "sold", "bought", "opened", "closed", "lost",
    "saw", "heard", "cleaned", "fixed", "mended", "kept", "took", "left", "brought", "made",
    "shared", "borrowed", "counted", "wrote", "read", "held", "showed", "hid", "moved",
    "cooked", "visited",
)
_PREPS = ("near", "under", "behind", "beside", "across", "toward", "past", "above", "inside", "around")
_ADVS = (
    "slowly", "quickly", "quietly", "happily", "alone", "again", "today", "later", "early",
    "twice", "often", "softly", "carefully", "gladly", "suddenly",
)
_TIMES = ("morning", "evening", "night", "spring", "summer", "autumn", "winter", "afternoon")
_NAMES = (
    "anna", "peter", "maria", "john", "clara", "tom", "emma", "paul", "lucy", "mark", "sofia",
    "daniel", "rosa", "hugo", "ella", "oscar", "nina", "felix", "ida", "leo", "greta", "max",
)
_FUNCTION = (
    "the", "a", "in", "to", "and", "was", "said", "there", "after", "then", "with", "his",
    "her", "it", "on", "at", "by", "from", "because", "while", "when", "very", "not", "had",
    "this", "every", "day", "nobody", "knew", "why", "went", "home",
)

# Sentence templates of the varied haystack. Slots: N noun, P place, A adjective, V intransitive
# verb, T transitive verb, R preposition, D adverb, M time, X name.
_SENTENCES = (
    "the A N V R the P .",
    "X V to the P in the M .",
    "in the M , the A N V R the N .",
    "X and X T a A N .",
    "there was a A N R the P .",
    "the N of the P V D .",
    "X said that the N was A .",
    "after the N V , X T the N D .",
    "the A N T the A N R the P .",
    "when the M was A , X V home .",
    "X T his A N and V D .",
    "every day the N V R the A P .",
    "nobody knew why the N was so A .",
    "X went to the P because the N was A .",
    "while the N V , X T her N .",
    "then X T it with a A N .",
)
_SLOTS: dict[str, tuple[str, ...]] = {
    "N": _NOUNS, "P": _PLACES, "A": _ADJS, "V": _VERBS, "T": _TVERBS,
    "R": _PREPS, "D": _ADVS, "M": _TIMES, "X": _NAMES,
}
_EXTRA_SENTENCE_WORDS = ("so",)

# Words a haystack can contain (used to keep syllables from colliding with real words).
_HAYSTACK_WORDS: frozenset[str] = frozenset(
    w
    for group in (_NOUNS, _PLACES, _ADJS, _VERBS, _TVERBS, _PREPS, _ADVS, _TIMES, _NAMES, _FUNCTION,
                  _EXTRA_SENTENCE_WORDS, tuple(REPETITIVE_TEXT.split()))
    for w in group
) | frozenset(w for s in _SENTENCES for w in s.split() if w not in _SLOTS)


def _make_syllables() -> tuple[str, ...]:
    """Consonant-vowel(-coda) syllables that are not words of the haystack or the templates."""
    onsets = "b d f g h k l m n p r s t v z".split()
    vowels = "a e i o u".split()
    codas = ["", "n", "r", "l", "s", "k", "m"]
    # Common English words that happen to be syllables: excluded so needles never read as text.
    english = {
        "bin", "bun", "ban", "bar", "bus", "dam", "den", "din", "dim", "dos", "far", "fun",
        "fin", "fan", "gun", "gas", "gum", "ham", "hen", "him", "hum", "his", "kin", "kim",
        "lam", "man", "men", "mum", "nun", "pan", "pen", "pin", "pun", "pus", "ran", "run",
        "rum", "sun", "son", "sin", "sum", "tan", "ten", "tin", "ton", "van", "vim", "zen",
        "bed", "bad", "red", "had", "her", "for", "nor", "per", "sir", "fur", "our", "gel",
        "sol", "pal", "pol", "bal", "gal", "dal", "del", "mol", "nil", "til", "tel", "kal",
        "bos", "has", "was", "yes", "bis", "mis", "dis", "les", "mas", "pas", "ras", "sis",
        "tis", "bok", "lek", "mak", "nek", "sik", "tok", "hem", "rem", "tam", "dom", "rom",
        "tom", "lim", "rim", "him", "gem", "mom", "pom", "ram", "sam", "tum", "vom", "bum",
        "hun", "nan", "non", "den", "pun", "ban", "fer", "mar", "tar", "mir", "tor", "dor",
        "pur", "gor", "bur", "lor", "sur", "bar", "car", "war", "jar", "kar", "zer", "bel",
        "fel", "hel", "mel", "nel", "pel", "sel", "vel", "zel",
    }
    out = []
    for o in onsets:
        for v in vowels:
            for c in codas:
                s = o + v + c
                if s in english or s in _HAYSTACK_WORDS or s in TEMPLATE_WORDS or s in ORDINALS:
                    continue
                out.append(s)
    return tuple(out)


SYLLABLES: tuple[str, ...] = _make_syllables()


def vocabulary_words() -> list[str]:
    """Every word the suite can emit, in a fixed order (used to build the testbed vocabulary)."""
    seen: dict[str, None] = {}
    for group in (PUNCT, TEMPLATE_WORDS, ORDINALS, tuple(sorted(_HAYSTACK_WORDS)), SYLLABLES):
        for w in group:
            seen.setdefault(w, None)
    return list(seen)


# --------------------------------------------------------------------------------------------
# Data structures
# --------------------------------------------------------------------------------------------


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Sample:
    """One evaluation sample.

    ``context`` is the haystack with the needles, ``question`` comes after it and ends with an
    answer prefix (the model continues it), ``answers`` are the gold strings (all must appear in
    the output for a score of 1), ``meta`` holds the generation details: the target and measured
    ``length`` in tokens, the ``depth`` (percent) of each needle, the needle texts, the
    canonical ``target`` completion, the haystack kind, the seed.
    """

    task: str
    context: str
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The text to feed the model: context, then question (which ends with the answer prefix)."""
        return self.context + " " + self.question


@dataclass
class Episode:
    """A sample as word lists plus the structure of its canonical answer.

    ``answer_words`` is the canonical completion (ends with ``"."``; the model's end-of-sequence
    token comes after it). ``choices`` marks the positions of ``answer_words`` where the order of
    the answer is free: ``choices[i]`` is the set of words that are correct at answer position
    ``i`` (the first word of every item not listed yet). Training uses it for a multi-target
    loss; evaluation ignores order anyway.
    """

    task: str
    context_words: list[str]
    question_words: list[str]
    answer_words: list[str]
    answers: list[str]
    choices: dict[int, list[str]]
    meta: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Haystacks and token counting
# --------------------------------------------------------------------------------------------


def _varied_sentence(rng: random.Random) -> str:
    template = rng.choice(_SENTENCES)
    return " ".join(rng.choice(_SLOTS[w]) if w in _SLOTS else w for w in template.split())


_REPETITIVE_SENTENCES = [s.strip() + " ." for s in REPETITIVE_TEXT.split(".") if s.strip()]


class _Counter:
    """Counts tokens of text pieces with a tokenizer (cached), or whitespace words if none."""

    def __init__(self, tokenizer: _Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def piece(self, text: str) -> int:
        """Tokens ``text`` adds when appended after a space (the way pieces are joined)."""
        if self.tokenizer is None:
            return len(text.split())
        n = self._cache.get(text)
        if n is None:
            # A leading space makes BPE tokenizers count the piece as it appears mid-text.
            n = len(self.tokenizer.encode(" " + text, add_special_tokens=False))
            self._cache[text] = n
        return n

    def text(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def _haystack(rng: random.Random, kind: str, budget: int, counter: _Counter) -> tuple[list[str], list[int]]:
    """Sentences whose token counts add up to at most ``budget`` (and as close as possible)."""
    if kind not in HAYSTACKS:
        raise ChunkKVError(f"haystack must be one of {', '.join(HAYSTACKS)}, got {kind!r}")
    sentences: list[str] = []
    counts: list[int] = []
    total = 0
    i = rng.randrange(len(_REPETITIVE_SENTENCES))
    while True:
        if kind == "varied":
            s = _varied_sentence(rng)
        else:
            s = _REPETITIVE_SENTENCES[i % len(_REPETITIVE_SENTENCES)]
            i += 1
        n = counter.piece(s)
        if total + n > budget:
            # Pad the remainder with short sentences so the length lands close to the target.
            if kind == "varied":
                for _ in range(20):
                    s = _varied_sentence(rng)
                    n = counter.piece(s)
                    if total + n <= budget:
                        break
                else:
                    break
            else:
                break
            if total + n > budget:
                break
        sentences.append(s)
        counts.append(n)
        total += n
    return sentences, counts


def _insert(
    sentences: list[str], counts: list[int], needles: list[str], depths: list[float]
) -> tuple[list[str], list[float]]:
    """Insert needles at sentence boundaries closest to the given depths (0..1, by tokens).

    Returns the new sentence list and the realised depth of each needle (fraction of the
    haystack tokens that precede it).
    """
    total = max(1, sum(counts))
    boundaries = [0]
    for c in counts:
        boundaries.append(boundaries[-1] + c)
    # Boundary index for each needle; needles with equal targets keep their order.
    slots: list[int] = []
    for d in depths:
        target = d * total
        best = min(range(len(boundaries)), key=lambda j: abs(boundaries[j] - target))
        slots.append(best)
    order = sorted(range(len(needles)), key=lambda k: (slots[k], k))
    out: list[str] = []
    realised = [0.0] * len(needles)
    nxt = 0
    for j in range(len(sentences) + 1):
        while nxt < len(order) and slots[order[nxt]] == j:
            k = order[nxt]
            realised[k] = boundaries[j] / total
            out.append(needles[k])
            nxt += 1
        if j < len(sentences):
            out.append(sentences[j])
    return out, realised


# --------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------

_DEFAULTS: dict[str, dict[str, int]] = {
    "niah_single": {},
    "niah_multikey": {"num_keys": 4},
    "niah_multivalue": {"num_values": 4},
    "niah_multiquery": {"num_queries": 4},
    "vt": {"num_hops": 4, "num_chains": 1},
}


def _words(rng: random.Random, pool: list[str], k: int) -> list[str]:
    """Take ``k`` distinct syllables off a shuffled pool (so no syllable repeats in a sample)."""
    if len(pool) < k:
        raise ValueError("syllable pool exhausted: too many needles for one sample")
    return [pool.pop() for _ in range(k)]


def _value(rng: random.Random, pool: list[str], value_len: tuple[int, int]) -> list[str]:
    return _words(rng, pool, rng.randint(*value_len))


def build_episode(
    task: str,
    rng: random.Random,
    length: int,
    tokenizer: _Tokenizer | None = None,
    depth: float | None = None,
    haystack: str = "varied",
    value_len: tuple[int, int] = (4, 4),
    **options: int,
) -> Episode:
    """Build one sample of ``task`` whose prompt is about ``length`` tokens long.

    ``depth`` (percent, 0..100) places the queried needle (``niah_single``,
    ``niah_multikey``) or the whole group of needles (other tasks, kept in order); ``None``
    spreads needles uniformly at random. ``options`` override the task's size parameters:
    ``num_keys`` (multikey: needles in total), ``num_values``, ``num_queries``, ``num_hops``
    (variable assignments after the root one), ``num_chains`` (vt: chains, one queried).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    opts = dict(_DEFAULTS[task])
    unknown = set(options) - set(opts)
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to {task}")
    opts.update(options)
    counter = _Counter(tokenizer)
    pool = list(SYLLABLES)
    rng.shuffle(pool)

    needles: list[list[str]] = []  # in context order
    queried: list[int] = []  # indices of needles the question is about (for depth placement)
    choices: dict[int, list[str]] = {}
    if task in ("niah_single", "niah_multikey"):
        n = 1 if task == "niah_single" else opts["num_keys"]
        keys = [_words(rng, pool, 2) for _ in range(n)]
        values = [_value(rng, pool, value_len) for _ in range(n)]
        needles = [["the", "special", "code", "for", *k, "is", *v, "."] for k, v in zip(keys, values)]
        target = rng.randrange(n)
        queried = [target]
        key, value = keys[target], values[target]
        question = ["question", ":", "what", "is", "the", "special", "code", "for", *key, "?",
                    "answer", ":", *key, "is"]
        answer = [*value, "."]
        answers = [" ".join(value)]
    elif task == "niah_multivalue":
        key = _words(rng, pool, 2)
        nv = opts["num_values"]
        if not 1 <= nv <= len(ORDINALS):
            raise ValueError(f"num_values must be in 1..{len(ORDINALS)}")
        values = [_value(rng, pool, value_len) for _ in range(nv)]
        ords = ORDINALS[:nv]
        needles = [["the", "special", "code", "for", *key, "number", o, "is", *v, "."]
                   for o, v in zip(ords, values)]
        queried = list(range(nv))
        # The question spells out the slots to fill ("one is ? . two is ? ."): the answer walks
        # that list and fetches each value from its needle.
        slots = [w for o in ords for w in (o, "is", "?", ".")]
        question = ["question", ":", "what", "are", "all", "the", "special", "codes", "for", *key,
                    "?", "fill", "in", ":", *slots, "answer", ":", ords[0], "is"]
        answer = [*values[0], "."]
        for o, v in zip(ords[1:], values[1:]):
            answer += [o, "is", *v, "."]
        answers = [" ".join(v) for v in values]
    elif task == "niah_multiquery":
        n = opts["num_queries"]
        keys = [_words(rng, pool, 2) for _ in range(n)]
        values = [_value(rng, pool, value_len) for _ in range(n)]
        needles = [["the", "special", "code", "for", *k, "is", *v, "."] for k, v in zip(keys, values)]
        queried = list(range(n))
        order = list(range(n))
        rng.shuffle(order)  # the question lists the keys in an order unrelated to the context
        listed: list[str] = []
        for j, i in enumerate(order):
            if j:
                listed.append("and" if j == n - 1 else ",")
            listed += keys[i]
        slots = [w for i in order for w in (*keys[i], "is", "?", ".")]
        k0 = keys[order[0]]
        question = ["question", ":", "what", "are", "the", "special", "codes", "for", *listed, "?",
                    "fill", "in", ":", *slots, "answer", ":", *k0, "is"]
        answer = [*values[order[0]], "."]
        for i in order[1:]:
            answer += [*keys[i], "is", *values[i], "."]
        answers = [" ".join(values[i]) for i in order]
    else:  # vt
        hops, n_chains = opts["num_hops"], opts["num_chains"]
        chains: list[list[list[str]]] = []
        roots: list[list[str]] = []
        for _ in range(n_chains):
            names = [_words(rng, pool, 2) for _ in range(hops + 1)]
            # The assigned value is two syllables, like a variable name (RULER uses a number).
            root = _words(rng, pool, 2)
            chains.append(names)
            roots.append(root)
        # Interleave the chains' lines randomly but keep each chain in order.
        lines_per_chain = []
        for names, root in zip(chains, roots):
            lines = [["var", *names[0], "=", "value", *root, "."]]
            lines += [["var", *names[i], "=", "var", *names[i - 1], "."] for i in range(1, len(names))]
            lines_per_chain.append(lines)
        cursor = [0] * n_chains
        chain_of: list[int] = []
        while any(cursor[c] < len(lines_per_chain[c]) for c in range(n_chains)):
            c = rng.choice([c for c in range(n_chains) if cursor[c] < len(lines_per_chain[c])])
            needles.append(lines_per_chain[c][cursor[c]])
            chain_of.append(c)
            cursor[c] += 1
        queried = [i for i, c in enumerate(chain_of) if c == 0]
        names = chains[0]
        # The answer prefix repeats the value; the model then names the variables in chain
        # order (each one is found from the previous one).
        question = ["question", ":", "find", "all", "variables", "that", "are", "assigned", "the",
                    "value", *roots[0], "?", "answer", ":", *roots[0]]
        answer = []
        for i, nm in enumerate(names):
            choices[len(answer)] = [m[0] for m in names[i:]]
            answer += nm
        answer.append(".")
        answers = [" ".join(nm) for nm in names]

    needle_texts = [" ".join(w) for w in needles]
    question_text = " ".join(question)
    fixed = sum(counter.piece(t) for t in needle_texts) + counter.piece(question_text)
    budget = max(0, length - fixed)
    sentences, counts = _haystack(rng, haystack, budget, counter)

    # Needle depths (fractions). Multi-needle groups at a given depth stay in context order.
    n_needles = len(needles)
    if depth is not None:
        if not 0 <= depth <= 100:
            raise ValueError("depth is a percentage in [0, 100]")
        d = depth / 100.0
        if task == "niah_multikey":
            depths = [rng.random() for _ in range(n_needles)]
            depths[queried[0]] = d
        else:
            depths = [d] * n_needles
    else:
        depths = sorted(rng.random() for _ in range(n_needles))
        if task == "niah_multikey":
            rng.shuffle(depths)
    if task == "vt" or (task == "niah_multivalue" and depth is None):
        depths = sorted(depths)  # assignment chains must read in order
    pieces, realised = _insert(sentences, counts, needle_texts, depths)
    context_words = " ".join(pieces).split()
    meta = {
        "haystack": haystack,
        "target_length": length,
        "depth": depth,
        "needles": needle_texts,
        "needle_depths": [round(100 * r, 2) for r in realised],
        "queried_needles": queried,
        "target": " ".join(answer),
        **opts,
    }
    return Episode(task, context_words, question, answer, answers, choices, meta)


def generate_samples(
    task: str,
    n: int,
    length: int,
    seed: int = 0,
    tokenizer: _Tokenizer | None = None,
    depth: float | None = None,
    haystack: str = "varied",
    **options: int,
) -> list[Sample]:
    """Generate ``n`` deterministic samples of ``task`` with prompts of about ``length`` tokens.

    Same ``(task, n, length, seed, depth, haystack, options)`` gives identical samples. Lengths
    are measured with ``tokenizer`` (``None``: whitespace words, exact for the testbed
    tokenizer) and land within a sentence (~10 tokens) below the target.

    >>> s = generate_samples("niah_single", 1, 512, seed=0)[0]
    >>> s.answers[0] in s.context
    True
    """
    if n < 0 or length <= 0:
        raise ValueError("n must be >= 0 and length > 0")
    out: list[Sample] = []
    for i in range(n):
        # String seeds are hashed with SHA-512 by random.Random: stable across runs/processes.
        rng = random.Random(f"chunkkv-synthetic|{task}|{length}|{seed}|{depth}|{haystack}|{i}")
        ep = build_episode(task, rng, length, tokenizer, depth=depth, haystack=haystack, **options)
        context = " ".join(ep.context_words)
        question = " ".join(ep.question_words)
        meta = dict(ep.meta)
        meta["seed"] = seed
        meta["index"] = i
        counter = _Counter(tokenizer)
        meta["length"] = counter.text(context + " " + question)
        out.append(Sample(task, context, question, list(ep.answers), meta))
    return out


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def score_sample(prediction: str, gold: Sequence[str]) -> float:
    """RULER ``string_match_all``: the fraction of gold strings contained in the prediction.

    Matching is case-insensitive and whitespace-normalised (runs of spaces/newlines count as one
    space), so ``"Vak  mor\\ntel"`` contains ``"vak mor tel"``.
    """
    if not gold:
        raise ValueError("gold must contain at least one answer string")
    pred = _norm(prediction)
    return sum(1.0 for g in gold if _norm(g) in pred) / len(gold)


def score_samples(predictions: Sequence[str], samples: Sequence[Sample]) -> float:
    """Mean :func:`score_sample` over samples (0..1)."""
    if len(predictions) != len(samples):
        raise ValueError("one prediction per sample")
    if not samples:
        return 0.0
    return sum(score_sample(p, s.answers) for p, s in zip(predictions, samples)) / len(samples)


ScoreFn = Callable[[str, Sequence[str]], float]
