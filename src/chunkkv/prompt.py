"""Checks on what a user hands to compression: the prompt, its padding, the method, the window.

Each check fails with a :class:`~chunkkv.errors.PromptError` (or another
:class:`~chunkkv.errors.ChunkKVError`) that says what is wrong and how to fix it, before any
forward pass runs.
"""

from __future__ import annotations

import torch

from .errors import ChunkKVError, PromptError
from .methods import FullKV, Method, StreamingLLM, make_method


def as_method(method: Method | str | None) -> Method:
    """``method`` itself, FullKV for None, or the method a name builds (``"full"``; others need a budget)."""
    if method is None:
        return FullKV()
    if isinstance(method, str):
        return make_method(method)  # unknown name or missing budget: a clear ChunkKVError
    if not isinstance(method, Method):
        raise ChunkKVError(
            f"method must be a chunkkv method such as chunkkv.ChunkKV(keep_fraction=0.1) or a name, "
            f"got {type(method).__name__}"
        )
    return method


def check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, T], attention_mask [B, T] long)`` checked: integer ids, a 0/1 mask of the same shape."""
    if not isinstance(input_ids, torch.Tensor):
        raise PromptError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise PromptError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise PromptError("the prompt is empty: give at least one token to compress")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise PromptError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise PromptError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise PromptError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise PromptError(
            "attention_mask may only hold 0 (left padding) and 1 (real token); it holds other values "
            "(chunkkv would count them as tokens and shift positions)"
        )
    return input_ids, attention_mask.to(device=input_ids.device, dtype=torch.long)


def row_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real tokens per row; checks the padding is on the left (one host sync per request)."""
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    width = mask.shape[-1]
    expected = torch.arange(width, device=mask.device)[None, :] >= (width - lengths)[:, None]
    lengths_host = lengths.tolist()
    if not torch.equal(mask, expected):
        raise PromptError(
            "the attention_mask is not left-padded: chunkkv needs each row's padding on the left "
            "(set tokenizer.padding_side = 'left')"
        )
    for row, n in enumerate(lengths_host):
        if n == 0:
            raise PromptError(f"row {row} of the batch has no real tokens (its attention_mask is all zeros)")
    return lengths_host


def check_window(method: Method, lengths: list[int]) -> None:
    """Raise :class:`PromptError` when a scoring method's window leaves no prefix in some row."""
    if isinstance(method, (FullKV, StreamingLLM)):
        return
    short = [(row, n) for row, n in enumerate(lengths) if n <= method.window]
    if short:
        row, n = short[0]
        raise PromptError(
            f"window={method.window} is not shorter than the prompt (row {row} has {n} tokens): the "
            "observation window must leave a prefix to score; lower `window` or use method 'full'"
        )


def _rope_reach(params, limit: int) -> int | None:
    """Positions a RoPE scaling setting stretches ``limit`` to (None: no fixed end, e.g. dynamic NTK)."""
    if not isinstance(params, dict):
        return limit
    if params and all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3)
        reaches = [_rope_reach(v, limit) for v in params.values()]
        return None if any(r is None for r in reaches) else max(reaches, default=limit)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "dynamic":
        return None
    factor = params.get("factor")
    if kind == "default" or not isinstance(factor, (int, float)) or factor <= 1:
        return limit
    original = params.get("original_max_position_embeddings")
    base = original if isinstance(original, int) and original > 0 else limit
    return max(limit, int(base * factor))


def position_limit(config) -> int | None:
    """The positions a model can attend over: ``max_position_embeddings``, stretched by a RoPE
    scaling setting (YaRN, linear, longrope, llama3: ``original_max_position_embeddings x factor``);
    None when the config gives no limit."""
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        return None
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(text, name, None)
        if isinstance(params, dict) and params:
            return _rope_reach(params, limit)
    return limit


def check_positions(config, width: int, *, what: str | None = None, fix: str = "shorten the prompt") -> None:
    """Raise :class:`PromptError` when ``width`` tokens (a prompt, or a prompt and what follows it)
    reach past the model's positions (:func:`position_limit`): past them a model's answers are
    garbage, and nothing else would say so."""
    limit = position_limit(config)
    if limit is not None and width > limit:
        head = what or f"the prompt has {width} tokens"
        raise PromptError(
            f"{head}, but the model was trained on at most {limit} positions (max_position_embeddings): "
            f"past them its output is garbage; {fix}"
        )
