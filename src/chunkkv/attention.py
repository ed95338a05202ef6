"""The one place chunkkv touches a model: an attention function in transformers' registry.

``attach(model)`` registers ``chunkkv_<impl>`` (``impl`` = the model's ``sdpa`` or ``eager``) with
``AttentionInterface`` / ``AttentionMaskInterface`` and switches *that model instance* to it. The
wrapper calls the original attention unchanged and adds two things:

* **at prefill, inside :func:`compression_session`**: it sees the query states exactly as the model
  computed them (RoPE, q-norm, fused qkv … whatever the family does), so after the layer's own
  attention it can score the prompt and prune the layer's cache; a session with an ``attend``
  method may compute a layer's attention itself instead (a question-agnostic scoring pass does:
  one softmax gives the output and the scores), and the model's own is then not run;
* **when attending over a pruned layer** (any later forward, including stock ``generate``): it
  trims the shared mask to this layer's stored length (PyramidKV layers differ) and masks filler
  slots (rows that keep fewer tokens than the longest row);
* **while a decode budget is set on the cache** (:class:`chunkkv.recompress.DecodeBudget`): after
  the layer's attention it buffers the recent queries and re-selects when the layer is full.

Nothing is patched globally and a model that is not attached behaves exactly as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import PrunedLayer, take_last_update
from .errors import UnsupportedModelError

PREFIX = "chunkkv_"
SUPPORTED = ("sdpa", "eager")

# The compression to run during the current prefill, if any (set by compress()).
_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar("chunkkv_session", default=None)


@contextlib.contextmanager
def compression_session(session: Any) -> Iterator[None]:
    """Run the enclosed forward pass with ``session.on_attention`` called after each attention."""
    token = _SESSION.set(session)
    try:
        yield
    finally:
        _SESSION.reset(token)


def _inner_attention(name: str, module: torch.nn.Module) -> Callable:
    if name == "eager":
        # Each family ships its own eager function (Gemma adds soft-capping): use the module's.
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} has no eager_attention_forward; load the model with attn_implementation='sdpa'"
            )
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


def _layer_mask(
    mask: torch.Tensor | None, layer: PrunedLayer, q_len: int, kv_len: int, q_heads: int = 1
) -> torch.Tensor | None:
    """The mask for one pruned layer: the suffix of the shared mask, with filler slots masked and,
    on a sliding-window layer the sequence has outgrown, keys outside the window masked."""
    if mask is not None and mask.shape[-1] > kv_len:
        mask = mask[..., -kv_len:]
    valid = layer.valid
    window = _window_keep(layer, q_len, kv_len, q_heads)
    if valid is None and window is None:
        return mask
    keep = valid[:, None, None, :] if valid is not None else None
    if window is not None:
        keep = window if keep is None else keep & window
    if mask is None:
        # The model skips the mask only for one query token without padding.
        return keep.expand(-1, -1, q_len, -1)
    if mask.dtype == torch.bool:
        return mask & keep
    return torch.where(keep, mask, torch.finfo(mask.dtype).min)


def _window_keep(layer: PrunedLayer, q_len: int, kv_len: int, q_heads: int) -> torch.Tensor | None:
    """``[B, 1 or Hq, q_len, kv_len]`` bool: stored keys inside the sliding window of each query,
    judged by the keys' *original* positions; None while the whole sequence fits in the window.

    The stock sliding mask places stored key ``j`` at position ``logical - stored + j``, which after
    pruning is at or after its real position, so it can only let too much through: this mask is
    ANDed with it. Key positions come from :meth:`PrunedLayer.slot_positions` (padded logical
    coordinates, per KV head for per-head methods).
    """
    window = layer.sliding_window
    logical = layer.logical_length
    if window is None or logical <= window:
        return None  # host ints: no sync
    device = layer.keys.device
    key_pos = layer.slot_positions()  # [B, 1 or Hkv, stored]: kept positions, then appended tokens
    q_pos = torch.arange(logical - q_len, logical, device=device)
    keep = key_pos[:, :, None, :] > (q_pos - window)[None, None, :, None]  # [B, h, q, kv]
    if keep.shape[1] > 1 and keep.shape[1] != q_heads:
        keep = keep.repeat_interleave(q_heads // keep.shape[1], dim=1)  # KV head -> its query heads
    return keep


def _make_wrapper(inner_name: str) -> Callable:
    def chunkkv_attention(module, query, key, value, attention_mask, **kwargs):
        inner = _inner_attention(inner_name, module)
        layer = take_last_update()
        if layer is not None and (layer.keys is None or layer.keys.shape[-2] != key.shape[-2]):
            layer = None  # not the keys this call attends over
        session = _SESSION.get()
        if layer is not None:
            # Also inside a session: a chunked prefill attends over a layer pruned by earlier chunks.
            attention_mask = _layer_mask(attention_mask, layer, query.shape[2], key.shape[2], query.shape[1])
        if layer is not None and session is not None and hasattr(session, "attend"):
            output = session.attend(module, layer, query, key, value, kwargs)
            if output is not None:
                return output
        output = inner(module, query, key, value, attention_mask, **kwargs)
        if layer is not None:
            if session is not None:  # the mask as this layer applied it (window, padding, fillers)
                session.on_attention(module, layer, query, key, {**kwargs, "attention_mask": attention_mask})
            elif layer.bound is not None:
                layer.bound.after_attention(module, layer, query, kwargs)
        return output

    chunkkv_attention.__name__ = f"chunkkv_{inner_name}_attention"
    return chunkkv_attention


def _register(inner_name: str) -> str:
    name = PREFIX + inner_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(inner_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner_name])
    return name


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder-only model, in depth order (must carry ``layer_idx``)."""
    found = [m for n, m in model.named_modules() if n.endswith("self_attn") and hasattr(m, "layer_idx")]
    return sorted(found, key=lambda m: m.layer_idx)


def inner_implementation(model: torch.nn.Module) -> str:
    """The attention implementation the model would use without chunkkv."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    return impl[len(PREFIX):] if impl.startswith(PREFIX) else impl


def check_model(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless chunkkv can hook this model."""
    if not hasattr(model, "config") or not attention_modules(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no decoder layers with a `self_attn` module carrying `layer_idx`; "
            "chunkkv supports decoder-only transformers models such as Llama, Mistral, Qwen2/3, Phi-3 and Gemma 2/3"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so chunkkv cannot see its queries; use a model family that does (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3)"
        )
    impl = inner_implementation(model)
    if impl not in SUPPORTED:
        raise UnsupportedModelError(
            f"attention implementation {impl!r} cannot be used with chunkkv (it needs {' or '.join(SUPPORTED)}); "
            "load the model with attn_implementation='sdpa', or call model.set_attn_implementation('sdpa')"
        )


def attach(model: torch.nn.Module) -> None:
    """Route this model's attention through chunkkv (idempotent; see the module docstring)."""
    check_model(model)
    impl = model.config._attn_implementation
    if impl.startswith(PREFIX):
        return
    model.set_attn_implementation(_register(impl))
    if not model.config._attn_implementation.startswith(PREFIX):
        raise UnsupportedModelError(
            f"{type(model).__name__} refused a custom attention implementation; chunkkv cannot hook it"
        )


def detach(model: torch.nn.Module) -> None:
    """Give the model its original attention implementation back."""
    impl = getattr(model.config, "_attn_implementation", "")
    if impl.startswith(PREFIX):
        model.set_attn_implementation(impl[len(PREFIX):])
