"""The question-agnostic default: what a method becomes when a context is compressed before any
question is known (``chunkkv.generate``, ``chunkkv generate``, ``chunkkv eval`` without
``--query-aware``, ``demo`` / ``inspect --question-agnostic``, the pipeline).

With ``scoring="window"`` a method scores the prompt with its own last ``window`` queries; when the
prompt is a document compressed before the question, those tokens say nothing about what will be
asked (on SmolLM2, 3 needles of 15 kept at 20 %, full cache 15). So a scoring method left at
``"window"`` gets :data:`AGNOSTIC_DEFAULT` — ``"hybrid"``: surprisal (each token's negative
log-likelihood) plus shallow reconstruction (the attention of the copy heads while the first
quarter of the layers repeats the context), each over its row maximum; see
:mod:`chunkkv.scorers` — and a :class:`~chunkkv.methods.ChunkKV` left at the paper's chunking gets
:data:`SENTENCE_CHUNKS`: one chunk per sentence (at most 30 tokens), ranked by the mean square root
of its tokens' scores plus 0.2 x the root of its strongest token, no pooling, so a fact is kept or
dropped whole. The measurements that chose it: ``studies/question_agnostic/README.md``.

Cost (SmolLM2-135M on CPU): 0.76-1.10x the prefill at 1k-8k tokens, on top of it; peak memory of a
full-cache prefill.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .boundaries import boundary_token_ids, digit_token_ids
from .errors import PromptError
from .methods import ChunkKV, Method
from .prompting import instruction_ids
from .scorers import SCORERS, resolve_scorer

__all__ = ["AGNOSTIC_DEFAULT", "PROMPTS", "SENTENCE_CHUNKS", "agnostic_method", "keep_numbers_whole", "scoring_prompt"]

#: The scoring a question-agnostic run gives a scoring method left at ``scoring="window"``.
AGNOSTIC_DEFAULT = "hybrid"
#: The chunking it gives a ChunkKV also left at the paper's (fixed chunks of 10, mean, max pooling
#: 7), with ``boundary_ids`` = the tokenizer's sentence ends.
SENTENCE_CHUNKS = {"segmentation": "sentence", "chunk_size": 30, "chunk_reduce": "sqrt_mean", "peak_weight": 0.2,
                   "kernel": 1}
_PAPER_CHUNKING = ("segmentation", "boundary_ids", "chunk_size", "chunk_reduce", "peak_weight", "pooling", "kernel")
#: The instruction each named scoring feeds (those that run a scoring pass).
PROMPTS = {name: scorer.passes()[0].instruction for name, scorer in SCORERS.items() if scorer.passes()}


def agnostic_method(
    method: Method | None, scoring: str | None = None, tokenizer=None, *, chunking: bool = True,
) -> Method | None:
    """The method a question-agnostic compression runs (one-shot or in chunks: a chunked prefill
    keeps the default's scores up to date chunk by chunk, :mod:`chunkkv.chunk_scoring`).

    ``scoring`` given: the method with that scoring, nothing else changed. Otherwise a scoring
    method left at ``"window"`` gets :data:`AGNOSTIC_DEFAULT`, and a :class:`ChunkKV` also left
    at the paper's chunking gets :data:`SENTENCE_CHUNKS` with the ``tokenizer``'s sentence ends
    (when a tokenizer is given and ``chunking``). Other methods are returned unchanged.
    """
    if scoring is not None:
        resolve_scorer(scoring)  # a misspelled name is an error even for a method that scores nothing
    if method is None or not method.scores_tokens:
        if scoring not in (None, "window") and method is not None:
            return replace(method, scoring=scoring)  # raises the method's own clear error
        return method
    if scoring is not None:
        return method if method.scoring == scoring else replace(method, scoring=scoring)
    if method.scoring != "window" or AGNOSTIC_DEFAULT == "window":
        return method
    method = replace(method, scoring=AGNOSTIC_DEFAULT)
    defaults = ChunkKV.__dataclass_fields__
    if chunking and tokenizer is not None and type(method) is ChunkKV and all(
            getattr(method, name) == defaults[name].default for name in _PAPER_CHUNKING):
        ends = boundary_token_ids(tokenizer, clauses=False)
        if ends:  # a vocabulary with no sentence ends keeps fixed chunks
            method = replace(method, boundary_ids=ends, **SENTENCE_CHUNKS)
    return method


def keep_numbers_whole(method: Method | None, tokenizer) -> Method | None:
    """``method`` with the tokenizer's digit tokens as ``digit_ids`` (a ChunkKV whose chunks should
    never cut a number written digit by digit), when it is a :class:`ChunkKV` without them; every
    other method as it is. What ``chunkkv.generate`` and the commands run, in both modes."""
    if type(method) is not ChunkKV or method.digit_ids is not None or tokenizer is None:
        return method
    digits = digit_token_ids(tokenizer)
    return replace(method, digit_ids=digits) if digits else method


def scoring_prompt(
    tokenizer: Any, scoring: str, separator: str = "\n\n", instruction: str | None = None, chat: bool | None = None
) -> torch.Tensor:
    """Token ids ``[n]`` of the instruction the named ``scoring`` feeds after the context
    (:func:`chunkkv.prompting.instruction_ids`); ``instruction`` replaces the scoring's own."""
    passes = resolve_scorer(scoring).passes()
    if not passes:
        raise PromptError(f"scoring={scoring!r} takes no prompt; scoring prompts exist for {', '.join(PROMPTS)}")
    return instruction_ids(tokenizer, instruction if instruction is not None else passes[0].instruction,
                           separator, chat)
