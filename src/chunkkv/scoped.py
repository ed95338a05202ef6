"""``with chunkkv.compressing(model, method):`` — stock ``model.generate`` on a compressed cache.

Inside the block, *that model instance's* ``generate`` (and so transformers'
``pipeline("text-generation", model=model)``, which calls it) compresses every prompt it is given
before decoding: the prompt except its last token goes through :func:`chunkkv.compress`, and stock
``generate`` then feeds that last token on the compressed cache and decodes. Tokens are exactly
those of ``chunkkv.compress(model, ids[:, :-1], mask[:, :-1], method)`` followed by
``model.generate(ids, attention_mask=mask, cache=ctx.cache, ...)``.

Why this shape (transformers 5.25): ``generate`` accepts a ready cache and feeds only the tokens it
does not hold, so compressing in front of it reuses the one recipe every entry point uses — every
method and scorer, inline or with a scoring pass (the question-agnostic default), chunked prefill —
and leaves decoding, sampling, streamers, stopping criteria and beam bookkeeping to transformers.
Compressing inside the prefill forward of ``generate`` instead would need a cache of ours created
by ``generate`` and would only work for inline scorers. Nothing global is patched: the instance
gets an attribute ``generate`` for the duration of the block, and on leaving it the attribute is
removed and the attention implementation set back, so the model is exactly as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .attention import check_model
from .context import CompressionStats
from .errors import ChunkKVError, PromptError
from .methods import Method
from .pipeline import compress
from .prompt import as_method

__all__ = ["Compressing", "compressing"]

# generate() arguments that carry a cache of the caller's: then the block leaves the call alone.
_CACHE_ARGS = ("cache", "past_key_values")


@dataclass
class Compressing:
    """What a ``with chunkkv.compressing(...) as run:`` block hands out.

    ``method``: the method every prompt is compressed with; ``calls``: prompts compressed so far;
    ``stats``: the :class:`~chunkkv.CompressionStats` of the last one (kept counts per layer, prompt
    lengths, prefill time), None before the first call.
    """

    method: Method
    calls: int = 0
    stats: CompressionStats | None = None


@contextlib.contextmanager
def compressing(
    model: torch.nn.Module,
    method: Method | str | None,
    tokenizer: Any = None,
    *,
    prefill_chunk: int | None = None,
    chat_template: bool | None = None,
) -> Iterator[Compressing]:
    """Make ``model.generate`` decode on a compressed cache inside the block (this instance only).

    Args:
        model: a transformers causal LM chunkkv supports (see :func:`chunkkv.compress`).
        method: the compression method (:class:`chunkkv.ChunkKV` …; None or ``"full"`` keeps
            everything). It runs as given: the prompt ``generate`` receives usually ends with the
            question, which is the papers' query-aware setting for window scoring. To compress as if
            the question were not known, pass ``chunkkv.agnostic.agnostic_method(method, tokenizer=tok)``.
        tokenizer: needed by scorers that run a scoring pass (``scoring="hybrid"``, reconstruction,
            probe) to tokenize their instruction; ``chat_template``: whether prompts were rendered with
            the tokenizer's chat template (None: when it has one), so the instruction is asked the same way.
        prefill_chunk: compress the prompt ``C`` tokens at a time (see :func:`chunkkv.compress`).

    A ``generate`` call given its own cache (``cache=`` / ``past_key_values=``), or a prompt of one
    token, runs unchanged. Prompts must be token ids (not ``inputs_embeds``), left-padded in a batch.

    Yields a :class:`Compressing` with the last call's :class:`~chunkkv.CompressionStats`.
    """
    method = as_method(method)
    check_model(model)
    state = Compressing(method)
    impl = model.config._attn_implementation
    own = vars(model)
    had, before = "generate" in own, own.get("generate")
    original = model.generate  # the bound method, or an enclosing block's wrapper

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        return _generate(model, original, state, tokenizer, prefill_chunk, chat_template, args, kwargs)

    model.generate = generate
    try:
        yield state
    finally:
        if had:
            model.generate = before
        else:
            own.pop("generate", None)
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)


def _generate(model, original, state: Compressing, tokenizer, prefill_chunk, chat_template, args, kwargs) -> Any:
    if any(kwargs.get(name) is not None for name in _CACHE_ARGS):
        return original(*args, **kwargs)  # the caller brings its own cache
    if kwargs.get("inputs_embeds") is not None:
        raise ChunkKVError("chunkkv.compressing: give generate() token ids (input_ids), not inputs_embeds: "
                           "the compressed prompt is built from ids")
    args = list(args)
    if args:
        ids, key = args[0], None
    else:
        key = "inputs" if kwargs.get("inputs") is not None else "input_ids"
        ids = kwargs.get(key)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        return original(*args, **kwargs)  # no prompt, or nothing before the token generate feeds
    config = kwargs.get("generation_config") or model.generation_config
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        raise ChunkKVError("chunkkv.compressing: generate(use_cache=False) would ignore the compressed cache")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask[:, -1].all()):
        raise PromptError("chunkkv.compressing: the batch is right-padded; pad on the left "
                          "(tokenizer.padding_side = 'left') so every row's prompt ends at the last column")
    method = state.method
    if prefill_chunk is not None and prefill_chunk >= ids.shape[1] - 1:
        prefill_chunk = None
    ctx = compress(model, ids[:, :-1], None if mask is None else mask[:, :-1], method,
                   prefill_chunk=prefill_chunk, tokenizer=tokenizer, chat_template=chat_template)
    state.calls += 1
    state.stats = ctx.stats
    cache = ctx.cache
    expand = max(int(kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1),
                 int(kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1))
    if expand > 1:
        cache.batch_repeat_interleave(expand)  # generate expands the prompt's rows, not a given cache
    kwargs["cache"] = cache
    return original(*args, **kwargs)

