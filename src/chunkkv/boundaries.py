"""Sentence and clause ends in a tokenizer's vocabulary, for boundary-aware ChunkKV chunks.

``ChunkKV(boundary_ids=boundary_token_ids(tokenizer))`` moves chunk edges to the token after a
sentence or clause end (see :func:`chunkkv.selection.boundary_segments`).
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["SENTENCE_ENDS", "CLAUSE_ENDS", "boundary_token_ids", "digit_token_ids"]

SENTENCE_ENDS = ".!?"
CLAUSE_ENDS = ",;:"

# tokenizer -> {(clauses, vocabulary size): ids}: the vocabulary scan runs once per tokenizer, not
# once per compression (question-agnostic generate asks for the sentence ends on every call).
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def boundary_token_ids(tokenizer: Any, clauses: bool = True) -> frozenset[int]:
    """Ids of the tokens whose text ends a sentence (``. ! ?``, optionally followed by closing quotes
    or brackets), a clause (``, ; :`` when ``clauses``) or contains a newline. Special tokens are
    left out. Remembered per tokenizer (and vocabulary size)."""
    key = (clauses, len(tokenizer))
    try:
        known = _FOUND.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: scan every time
        known = {}
    if key not in known:
        known[key] = _scan(tokenizer, clauses)
    return known[key]


def _scan(tokenizer: Any, clauses: bool) -> frozenset[int]:
    ends = SENTENCE_ENDS + (CLAUSE_ENDS if clauses else "")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    found = set()
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        stripped = text.rstrip().rstrip("\"')]}\u201d\u2019")
        if "\n" in text or (stripped and stripped[-1] in ends):
            found.add(token_id)
    return frozenset(found)


def digit_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokens whose text is one or more digits and nothing else (no space): the pieces a
    tokenizer that writes numbers digit by digit (SmolLM2, Gemma, Llama 3) cuts them into, so
    ``ChunkKV(digit_ids=...)`` can keep a run of them in one chunk. Remembered per tokenizer."""
    key = ("digits", len(tokenizer))
    try:
        known = _FOUND.setdefault(tokenizer, {})
    except TypeError:
        known = {}
    if key not in known:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        known[key] = frozenset(
            i for i in range(len(tokenizer)) if i not in special and _is_digits(tokenizer.decode([i])))
    return known[key]


def _is_digits(text: str) -> bool:
    return bool(text) and text.isascii() and text.isdigit()
