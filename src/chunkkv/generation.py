"""Decoding on a compressed context: the library's own loop and a text-level ``generate``.

The loop feeds new tokens with positions that continue each row's *original* prompt length and a
2-D attention mask over logical positions, exactly what stock ``model.generate`` does with a
:class:`~chunkkv.cache.ChunkKVCache`, so both give the same tokens (greedy).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .agnostic import agnostic_method, keep_numbers_whole
from .pipeline import compress
from .context import CompressedContext
from .errors import ChunkKVError, PromptError
from .methods import ChunkKV, Method
from .prompt import check_positions
from .prompting import chat_template_available, render_prompt
from .scorers import resolve_scorer


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``do_sample=False`` is greedy (the default, and what tests compare)."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ChunkKVError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.do_sample and self.temperature <= 0:
            raise ChunkKVError(f"temperature={self.temperature} must be > 0 when sampling")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ChunkKVError(f"top_p={self.top_p} must be in (0, 1]")


def _warpers(sampling: Sampling) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


def _eos_ids(model, sampling: Sampling) -> list[int]:
    eos = sampling.eos_token_id
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


@torch.inference_mode()
def extend(model: torch.nn.Module, context: CompressedContext, new_ids: torch.Tensor) -> torch.Tensor:
    """Append ``new_ids [B, n]`` to a compressed context and return their logits ``[B, n, vocab]``.

    Positions continue each row's original prompt (kept keys keep their rotation); the context's
    cache, attention mask and ``next_logits`` are updated in place.
    """
    batch = context.attention_mask.shape[0]
    if new_ids.dim() == 1:
        new_ids = new_ids[None]
    if new_ids.dim() == 2 and new_ids.shape[0] == 1:
        new_ids = new_ids.expand(batch, -1)  # one question for every row
    if new_ids.dim() != 2 or new_ids.shape[0] != batch or new_ids.shape[1] == 0:
        raise PromptError(f"new tokens must have shape [{batch}, n>0], got {tuple(new_ids.shape)}")
    device = context.attention_mask.device
    new_ids = new_ids.to(device)
    n = new_ids.shape[1]
    # the mask's width is the longest row's length (left padding): no device sync needed
    end = context.attention_mask.shape[1] + n
    check_positions(getattr(model, "config", None), end,
                    what=f"{n} more tokens would take the context to {end} positions",
                    fix="shorten the prompt or what is appended to it")
    positions = context.attention_mask.sum(-1, keepdim=True) + torch.arange(n, device=device)[None, :]
    mask = torch.cat([context.attention_mask, context.attention_mask.new_ones(batch, n)], dim=-1)
    out = model(
        input_ids=new_ids, attention_mask=mask, position_ids=positions, cache=context._cache, use_cache=True
    )
    context.attention_mask = mask
    context.next_logits = out.logits[:, -1, :]
    return out.logits


def set_decode_budget(
    context: CompressedContext,
    decode_budget: int | None,
    compress_every: int | None = None,
    method: Method | None = None,
) -> None:
    """Bound ``context``'s cache while it grows (see :class:`chunkkv.recompress.DecodeBudget`).

    ``decode_budget=None`` leaves the cache unbounded. ``compress_every`` defaults to
    :data:`DEFAULT_COMPRESS_EVERY`; ``method`` defaults to the one that compressed the context.
    Re-selection scores with the recent queries (``scoring="window"``) and, for ChunkKV, cuts fixed
    chunks of the method's chunk size (sentence chunks need the prompt's ids, which a grown cache
    no longer lines up with).
    """
    if decode_budget is None:
        if compress_every is not None:
            raise ChunkKVError("compress_every needs decode_budget (the tokens each layer keeps while decoding)")
        return
    every = DEFAULT_COMPRESS_EVERY if compress_every is None else compress_every
    method = method or context.method
    if method.scores_tokens and method.scoring != "window":
        # Re-selection while decoding scores with the recent queries: question-agnostic scoring
        # (chunkkv.agnostic) only ranks the prompt once, after its prefill.
        method = replace(method, scoring="window")
    if isinstance(method, ChunkKV) and (method.chunking != "fixed" or method.digit_ids):
        # Boundary-aware chunks need the prompt's token ids, which a grown cache no longer lines
        # up with: re-selection cuts the fixed grid of the same chunk size.
        method = replace(method, segmentation="fixed", boundary_ids=None, digit_ids=None)
    context._cache.set_decode_budget(method, decode_budget, every)


# Tokens a layer may grow past the decode budget before it re-selects (when not given).
DEFAULT_COMPRESS_EVERY = 32


@torch.inference_mode()
def continue_from(
    model: torch.nn.Module,
    context: CompressedContext,
    new_ids: torch.Tensor | None = None,
    sampling: Sampling | None = None,
    *,
    decode_budget: int | None = None,
    compress_every: int | None = None,
) -> torch.Tensor:
    """Generate after a compressed context, optionally feeding ``new_ids`` (e.g. a question) first.

    Works on a fork: the context is left as it was, so a second call with the same arguments gives
    the same tokens (use :func:`extend` to grow a context in place).

    Args:
        context: from :func:`chunkkv.compress`.
        new_ids: ``[B, n]`` (or ``[n]``, shared by all rows) tokens to append before generating;
            None generates straight from the prompt's last logits (query-aware mode).
        sampling: :class:`Sampling` (greedy by default).
        decode_budget, compress_every: bound the cache while decoding: a layer that reaches
            ``decode_budget + compress_every`` tokens keeps ``decode_budget`` of them, chosen by the
            context's method (see :class:`chunkkv.recompress.DecodeBudget`). It is set on the fork
            this call works on; :func:`set_decode_budget` bounds a context itself (and its forks).

    Returns:
        ``[B, m]`` generated token ids (``m <= max_new_tokens``); rows that finished early are
        padded with the pad token, as ``model.generate`` does.
    """
    sampling = sampling or Sampling()
    device = context.attention_mask.device
    batch = context.attention_mask.shape[0]
    eos = _eos_ids(model, sampling)
    pad = sampling.pad_token_id
    if pad is None:
        pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    fed = 0 if new_ids is None else (new_ids.shape[-1] if new_ids.dim() else 1)
    end = context.attention_mask.shape[1] + fed + sampling.max_new_tokens - 1
    check_positions(getattr(model, "config", None), end,
                    what=(f"the context ({context.attention_mask.shape[1]} tokens), {fed} new tokens and up to "
                          f"{sampling.max_new_tokens} generated ones reach position {end}"),
                    fix="lower max_new_tokens or shorten the prompt")
    context = context.fork()  # never change the caller's context (no tensor copies)
    set_decode_budget(context, decode_budget, compress_every)
    warpers = _warpers(sampling)
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    if new_ids is not None:
        extend(model, context, new_ids)
    logits = context.next_logits
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, device=device) if eos else None
    out_tokens = []
    for i in range(sampling.max_new_tokens):
        scores = logits.float()
        if sampling.do_sample:
            scores = warpers(None, scores)
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        else:
            token = scores.argmax(dim=-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out_tokens.append(token)
        if eos_t is not None:
            finished = finished | torch.isin(token, eos_t)
            # One sync per token to stop early, as transformers' generate does.
            if bool(finished.all()):
                break
        if i + 1 < sampling.max_new_tokens:
            extend(model, context, token[:, None])
            logits = context.next_logits
    return torch.stack(out_tokens, dim=1)


@dataclass
class Answer:
    """Answers to one question for every context row, with what they cost."""

    question: str
    texts: list[str]
    token_ids: list[list[int]]
    seconds: float


@dataclass
class GenerationResult:
    """Output of :func:`generate`.

    ``context``: the compressed context the answers were decoded on (question-agnostic: the one
    shared by every question; query-aware: the last question's), e.g. to inspect
    ``context.kept_positions(layer)`` or ``context.save(path)``.
    """

    answers: list[Answer]
    kept_tokens: dict[int, list[int]] = field(default_factory=dict)
    prompt_tokens: list[int] = field(default_factory=list)
    cache_bytes: int = 0
    compress_seconds: float = 0.0
    context: CompressedContext | None = None


def _encode(tokenizer, texts: list[str], device, add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer,
    context: str | list[str],
    questions: str | list[str],
    method: Method | None = None,
    *,
    sampling: Sampling | None = None,
    query_aware: bool = False,
    prefill_chunk: int | None = None,
    decode_budget: int | None = None,
    compress_every: int | None = None,
    chat_template: bool | None = None,
    scoring: str | None = None,
    answer_prefix: str = "",
) -> GenerationResult:
    """Answer each question on a compressed context (text in, text out).

    By default the context is compressed once without seeing any question (question-agnostic, as
    kvpress's pipeline does) and every question is answered on the same compressed cache. With
    ``query_aware=True`` the question is appended to the context before compression, once per
    question, so the observation window is the question itself.

    Args:
        context: one document or a batch (each row chooses its own tokens; left padding).
        questions: one or more questions asked of every context row.
        method: a compression method; None keeps the full cache.
        prefill_chunk: prefill in chunks of this many tokens (see :func:`chunkkv.compress`).
        decode_budget, compress_every: bound the cache while answering (see :func:`continue_from`).
        chat_template: render ``context + "\n\n" + question`` as one user turn of the tokenizer's
            chat template (None = when the tokenizer has one). The compressed part is everything up
            to the end of the context; the question, end of turn and assistant header follow it.
            False: the raw text ``context + question``, with the tokenizer's special tokens.
        scoring: how a scoring method ranks tokens (``"window"``, ``"hybrid"``, ``"surprisal"``,
            ``"shallow_reconstruction"``, ``"reconstruction"``, ``"probe"``, see :mod:`chunkkv.agnostic`). None: the method's own setting, except that a
            question-agnostic run of a method left at ``"window"`` uses
            :data:`chunkkv.agnostic.AGNOSTIC_DEFAULT` (the document's last tokens say nothing about
            the questions to come); pass ``scoring="window"`` to force the window.
        answer_prefix: text the answer starts with, fed after the question (after the assistant
            header with the chat template), e.g. ``"Answer:"``; the returned texts are what follows it.
    """
    contexts = [context] if isinstance(context, str) else list(context)
    qs = [questions] if isinstance(questions, str) else list(questions)
    if not contexts or any(not c for c in contexts):
        raise PromptError("the context is empty: give the text to compress")
    if not qs:
        raise PromptError("give at least one question")
    if any(not isinstance(q, str) or not q.strip() for q in qs):
        raise PromptError("a question is empty: give the text of every question")
    if scoring is not None:
        resolve_scorer(scoring)  # a misspelled scoring is an error even where no method scores (method=None)
    sampling = sampling or Sampling()
    if sampling.eos_token_id is None and tokenizer.eos_token_id is not None:
        sampling = Sampling(**{**sampling.__dict__, "eos_token_id": tokenizer.eos_token_id})
    device = next(model.parameters()).device
    use_chat = chat_template_available(tokenizer) if chat_template is None else bool(chat_template)
    if use_chat and not chat_template_available(tokenizer):
        raise PromptError("chat_template=True but this tokenizer has no chat template; pass chat_template=False")

    def split(text: str, question: str) -> tuple[str, str]:
        head, tail = render_prompt(tokenizer, text, "\n\n" + question if use_chat else question, use_chat)
        return head, tail + answer_prefix

    result = GenerationResult(answers=[])
    shared = None
    method = keep_numbers_whole(method, tokenizer)
    if not query_aware:
        method = agnostic_method(method, scoring, tokenizer)
        heads = [split(c, qs[0])[0] for c in contexts]  # the context part does not depend on the question
        ids, mask = _encode(tokenizer, heads, device, add_special_tokens=not use_chat)
        shared = compress(model, ids, mask, method, prefill_chunk=prefill_chunk, tokenizer=tokenizer,
                          chat_template=use_chat)
        result.kept_tokens, result.prompt_tokens = shared.stats.kept, shared.stats.prompt_lengths
        result.cache_bytes = shared.cache.nbytes()
        result.compress_seconds = shared.stats.prefill_seconds + shared.stats.scoring_seconds
        result.context = shared
    if query_aware and scoring is not None and method is not None and method.scoring != scoring:
        method = replace(method, scoring=scoring)
    for question in qs:
        start = time.perf_counter()
        if query_aware:
            ids, mask = _encode(tokenizer, ["".join(split(c, question)) for c in contexts], device,
                                add_special_tokens=not use_chat)
            ctx = compress(model, ids, mask, method, prefill_chunk=prefill_chunk, tokenizer=tokenizer,
                           chat_template=use_chat)
            result.kept_tokens, result.prompt_tokens = ctx.stats.kept, ctx.stats.prompt_lengths
            result.cache_bytes = max(result.cache_bytes, ctx.cache.nbytes())
            result.compress_seconds += ctx.stats.prefill_seconds + ctx.stats.scoring_seconds
            result.context = ctx
            tokens = continue_from(model, ctx, None, sampling, decode_budget=decode_budget, compress_every=compress_every)
        else:
            tail = split(contexts[0], question)[1]
            q_ids = tokenizer(tail, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            if q_ids.shape[1] == 0:
                raise PromptError(f"question {question!r} encodes to no tokens")
            tokens = continue_from(  # works on a fork of the shared context
                model, shared, q_ids, sampling, decode_budget=decode_budget, compress_every=compress_every
            )
        rows = [_strip(t, sampling, tokenizer) for t in tokens.tolist()]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        result.answers.append(Answer(question, texts, rows, time.perf_counter() - start))
    return result


def _strip(tokens: list[int], sampling: Sampling, tokenizer) -> list[int]:
    """Cut a row at its first end-of-sequence token."""
    eos = sampling.eos_token_id
    stops = set([eos] if isinstance(eos, int) else (eos or []))
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens
