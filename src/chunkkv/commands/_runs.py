"""Run several methods on one prompt and record what each kept, cost and answered.

Shared by ``chunkkv demo`` (terminal view) and ``chunkkv inspect`` (HTML report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pipeline import compress, compress_from_capture, prefill
from ..generation import Sampling, continue_from, set_decode_budget
from ..analysis import context_kept_masks, jaccard_matrix, mean_head_jaccard, shares_heads, union_over_heads
from ..cli_common import Prompt, Timer, full_cache_bytes


@dataclass
class MethodRun:
    """One method on one prompt.

    Attributes:
        masks: ``[L, Hkv, T]`` bool, the prompt tokens each full-attention layer kept, per KV head.
        layers: the model layer index of each row of ``masks``.
        kept_bytes / full_bytes: KV memory of the compressed cache right after prefill / of a full one.
        prefill_seconds: the compressing prefill; answer_seconds: question + decoding.
    """

    name: str
    description: str
    masks: torch.Tensor
    layers: list[int]
    kept_bytes: int
    full_bytes: int
    prefill_seconds: float
    answer: str | None = None
    answer_tokens: int = 0
    answer_seconds: float = 0.0
    correct: bool | None = None
    extra: dict = field(default_factory=dict)

    @property
    def union(self) -> torch.Tensor:
        """``[L, T]``: kept by at least one KV head (the kept set of a layer for per-head methods)."""
        return union_over_heads(self.masks)

    @property
    def all_heads(self) -> torch.Tensor:
        """``[L, T]``: kept by every KV head."""
        return self.masks.all(dim=1)

    @property
    def per_head(self) -> bool:
        """True when the heads of a layer kept different tokens (SnapKV, H2O, ...)."""
        return not shares_heads(self.masks)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.answer_seconds

    def jaccard(self) -> torch.Tensor:
        """Layer x layer Jaccard of the kept sets (union over heads)."""
        return jaccard_matrix(self.union)

    def head_jaccard(self) -> torch.Tensor | None:
        """Mean over heads of the per-head Jaccard (None for methods with one set per layer)."""
        return mean_head_jaccard(self.masks) if self.per_head else None

    def kept_counts(self) -> list[int]:
        return self.union.sum(-1).tolist()

    def mean_head_counts(self) -> list[float]:
        return self.masks.sum(-1).float().mean(-1).tolist()


def run_methods(
    model,
    tokenizer,
    prompt: Prompt,
    methods,
    *,
    question_ids: torch.Tensor | None = None,
    sampling: Sampling | None = None,
    bar=None,
    bounds: dict | None = None,
    chat_template: bool | None = None,
) -> list[MethodRun]:
    """Compress ``prompt`` with each method (as it runs: see :func:`chunkkv.cli_common.method_as_run`);
    answer when ``sampling`` is given.

    With ``question_ids`` (question-agnostic mode) those tokens are fed after the compressed
    prompt before decoding; otherwise decoding starts right after the prompt (query-aware: the
    question is the end of the prompt). ``bounds`` (from :func:`chunkkv.cli_common.bounds_from_args`)
    applies chunked prefill and a decode budget to the methods that can re-select (not the full
    cache, which stays the reference, nor the kvpress preset). ``chat_template``: whether the prompt
    was rendered with the tokenizer's chat template (for scoring-pass instructions; None: auto).
    Two or more methods share one prefill (:func:`chunkkv.pipeline.prefill`).
    """
    device = next(model.parameters()).device
    ids = prompt.input_ids.to(device)
    runs = []
    task = bar.add_task("compressing", total=len(methods)) if bar is not None else None
    chunked = bounds is not None and bounds.get("prefill_chunk") is not None
    capture = None
    if not chunked and len(methods) > 1:
        if bar is not None:
            bar.update(task, description=f"prefill {ids.shape[1]} tokens (once, shared by every method)")
        capture = prefill(model, ids, methods=methods, tokenizer=tokenizer, chat_template=chat_template)
    for method in methods:
        if bar is not None:
            bar.update(task, description=f"{method.name}: " + ("selecting" if capture else f"prefill {ids.shape[1]} tokens"))
        bounded = bounds is not None and method.name != "full" and method.exact_budget
        chunk = bounds["prefill_chunk"] if bounded else None
        if capture is not None and chunk is None:
            ctx = compress_from_capture(capture, method)
        else:
            ctx = compress(model, ids, method=method, prefill_chunk=chunk, tokenizer=tokenizer,
                           chat_template=chat_template)
        if bounded and bounds["decode_budget"] is not None:
            set_decode_budget(ctx, bounds["decode_budget"], bounds["compress_every"])
        layers, masks = context_kept_masks(ctx)
        run = MethodRun(
            name=method.name,
            description="full" if method.name == "full" else ctx.method.describe(),  # what ran
            masks=masks,
            layers=layers,
            kept_bytes=ctx.cache.nbytes(),
            full_bytes=full_cache_bytes(ctx.cache, ids.shape[1]),
            prefill_seconds=ctx.stats.prefill_seconds + ctx.stats.select_seconds + ctx.stats.scoring_seconds,
        )
        if sampling is not None:
            if bar is not None:
                bar.update(task, description=f"{method.name}: answering")
            with Timer(device) as timer:
                tokens = continue_from(model, ctx, question_ids, sampling)[0].tolist()
            stops = sampling.eos_token_id
            stops = set([stops] if isinstance(stops, int) else (stops or []))
            for i, t in enumerate(tokens):
                if t in stops:
                    tokens = tokens[:i]
                    break
            run.answer = tokenizer.decode(tokens, skip_special_tokens=True)
            run.answer_tokens = len(tokens)
            run.answer_seconds = timer.seconds
        del ctx
        runs.append(run)
        if bar is not None:
            bar.advance(task)
    return runs
