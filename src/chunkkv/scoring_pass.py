"""Running a scoring pass: extra tokens fed after a captured context to score it (the glue behind
:class:`chunkkv.scorers.ReconstructionScorer` and :class:`~chunkkv.scorers.ProbeScorer`).

The tokens are the pass's instruction and, for reconstruction, the context itself again
(teacher-forced). They run on a fork of the context's full cache, so they never stay in it, with
positions that continue each row's context. For every scored layer the attention wrapper lets the
session compute the attention itself (:func:`chunkkv.scoring.attend_and_score`: one softmax gives
the layer's output and the scores), so the model's own attention does not run beside it. A pass
with a ``depth`` stops the forward after its last scored layer.

Reconstruction repeats the context ``chunk`` tokens at a time, each chunk after the instruction on a
fresh fork (KVzip's chunked form): the repeated tokens then never sit further than instruction +
chunk past the context, inside the positions the model was trained on.
"""

from __future__ import annotations

from typing import Any

import torch

from .attention import compression_session
from .cache import PrunedLayer
from .errors import PromptError, UnsupportedModelError
from .scorers import ScoringPass
from .scoring import attend_and_score, masked_attention_scores, max_attention_scores

#: The fewest context tokens repeated per reconstruction chunk (``chunk="auto"``): chunks are as long
#: as the model's trained positions allow, never shorter than this.
RECONSTRUCTION_CHUNK = 512


class ScoredEnough(Exception):
    """Raised by the scoring session after its last layer: the rest of the forward is not needed."""


class _ScoringSession:
    """The attention wrapper's session during a scoring pass: collect scores, never prune."""

    def __init__(self, layers: set[int], context_len: int, reduce: str, stop_early: bool = False) -> None:
        self.cache = None  # the fork the current segment appends to (set per segment)
        self.layers = layers
        # Stop the forward after the last scored layer: only when the pass's own output (its logits,
        # the later layers' cache) is not wanted.
        self.stop_after = max(layers) if stop_early and layers else None
        self.context_len = context_len
        self.reduce = reduce
        self.key_valid: torch.Tensor | None = None
        self.query_valid: torch.Tensor | None = None
        self.scores: dict[int, torch.Tensor] = {}

    def attend(self, module, layer: PrunedLayer, query, key, value, kwargs) -> tuple[torch.Tensor, None] | None:
        """The attention of a scored layer, computed once for its output and its scores; None (the
        model's attention runs, then :meth:`on_attention`) for other layers and for features this
        does not compute."""
        if not self._scored(module, layer) or any(
                kwargs.get(name) is not None for name in ("sliding_window", "s_aux", "position_bias")):
            return None
        output, block = attend_and_score(
            query, key, value, _scaling(module, key, kwargs), self.context_len, self.key_valid,
            self.query_valid, kwargs.get("softcap"), self.reduce,
        )
        self._add(module.layer_idx, block)
        return output.transpose(1, 2).contiguous(), None  # [B, q, Hq, dv], as the attention functions return

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        if not self._scored(module, layer):
            return
        mask = kwargs.get("attention_mask")
        if kwargs.get("sliding_window") is not None and mask is not None:
            # the layer sees a window of keys: score what it attends to, as its own mask says
            scores = masked_attention_scores(query, key, _scaling(module, key, kwargs), mask, self.context_len,
                                             self.query_valid, kwargs.get("softcap"), self.reduce)
        else:
            scores = max_attention_scores(query, key, _scaling(module, key, kwargs), self.context_len, self.key_valid,
                                          self.query_valid, kwargs.get("softcap"), self.reduce)
        self._add(module.layer_idx, scores)

    def _scored(self, module, layer: PrunedLayer) -> bool:
        return module.layer_idx in self.layers and layer is self.cache.layers[module.layer_idx]

    def _add(self, idx: int, block: torch.Tensor) -> None:
        previous = self.scores.get(idx)
        if previous is None:
            self.scores[idx] = block
        elif self.reduce == "max":
            self.scores[idx] = torch.maximum(previous, block)
        else:
            self.scores[idx] = previous + block
        if idx == self.stop_after:
            raise ScoredEnough


def _scaling(module, key, kwargs) -> float:
    return kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5)


def scoring_tokens(
    spec: ScoringPass, prompt: torch.Tensor, input_ids: torch.Tensor, lengths: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, R]`` tokens of a pass and their mask: the instruction ``prompt [n]``, then
    (reconstruction) each row's own real context tokens."""
    device = input_ids.device
    prompt = prompt.to(device).reshape(-1)
    batch, width = input_ids.shape
    if not spec.repeat:
        ids = prompt[None].expand(batch, -1)
        return ids, torch.ones_like(ids)
    n = prompt.numel()
    total = n + max(lengths)
    ids = torch.zeros(batch, total, dtype=input_ids.dtype, device=device)
    mask = torch.zeros(batch, total, dtype=torch.long, device=device)
    ids[:, :n] = prompt
    # Each row's real tokens are the last ``lengths[b]`` of its left-padded row: shift them left by its
    # padding (one gather, no loop over rows).
    real_n = torch.tensor(lengths, device=device)
    src = (torch.arange(total - n, device=device)[None, :] + (width - real_n)[:, None]).clamp(max=width - 1)
    real = torch.arange(total - n, device=device)[None, :] < real_n[:, None]
    ids[:, n:] = torch.where(real, torch.gather(input_ids, 1, src), 0)
    mask[:, :n] = 1
    mask[:, n:] = real.long()
    return ids, mask


def auto_chunk(config, context_len: int, n_prompt: int) -> int | None:
    """The reconstruction chunk ``chunk="auto"`` uses: as many context tokens as fit between the
    context plus the instruction and the model's trained length (``max_position_embeddings``), at
    least :data:`RECONSTRUCTION_CHUNK`; None (one pass) when the config gives no length.

    Why: repeated in one pass, the copy of an 8k context sits at positions 8k-16k, past an 8k
    model's trained range, and its attention there no longer finds the tokens it copies.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    return max(RECONSTRUCTION_CHUNK, limit - context_len - n_prompt)


def segments(
    ids: torch.Tensor, mask: torch.Tensor, n_prompt: int, chunk: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pass's tokens ``[B, R]`` as the segments fed one after another, each on a fresh fork of the
    context's cache: the instruction's ``n_prompt`` tokens, then ``chunk`` tokens of the repeated
    context. ``chunk=None``: one segment, everything."""
    total = ids.shape[1]
    if chunk is None or total - n_prompt <= chunk:
        return [(ids, mask)]
    head = slice(0, n_prompt)
    return [(torch.cat([ids[:, head], ids[:, start:start + chunk]], dim=1),
             torch.cat([mask[:, head], mask[:, start:start + chunk]], dim=1))
            for start in range(n_prompt, total, chunk)]


@torch.inference_mode()
def run_pass(
    model: torch.nn.Module,
    capture: Any,
    spec: ScoringPass,
    layers: list[int],
    prompt: torch.Tensor,
    block: int = 512,
    chunk: int | str | None = "auto",
) -> dict[int, torch.Tensor]:
    """Run one scoring pass after a captured prefill; ``{layer: [B, Hkv, T]}`` raw scores (padded
    coordinates) for ``layers``. The capture's cache is not changed.

    Args:
        capture: a :class:`chunkkv.capture.PrefillCapture` of the context (its ``cache``,
            ``input_ids``, ``attention_mask`` and ``lengths`` are read).
        layers: the compressed layers to score (a pass with ``depth`` stops after the last).
        prompt: ``[n]`` token ids of the instruction (may be empty).
        block: pass tokens per forward (memory O(block x context) per head; the scores do not
            depend on it).
        chunk: reconstruction only: context tokens repeated per segment; ``"auto"``: the longest
            that keeps every position inside ``max_position_embeddings``, at least
            :data:`RECONSTRUCTION_CHUNK`; None: one pass. The scores depend on it.
    """
    if chunk != "auto" and chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise PromptError(f"chunk={chunk!r} must be an int >= 1, 'auto' or None (context tokens repeated per chunk)")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise PromptError(f"scoring_block={block!r} must be an int >= 1 (scoring tokens per forward pass)")
    if not layers:
        return {}
    ids, mask = scoring_tokens(spec, prompt, capture.input_ids, capture.lengths)
    if ids.shape[1] == 0:
        raise PromptError("the scoring pass has no tokens: give it an instruction (scoring_prompt or a tokenizer)")
    width = capture.input_ids.shape[1]
    device = ids.device
    session = _ScoringSession(set(layers), width, spec.reduce, stop_early=spec.depth is not None)
    real = torch.tensor(capture.lengths, device=device)
    n_prompt = prompt.numel() if spec.repeat else 0
    if chunk == "auto":
        chunk = auto_chunk(model.config, width, n_prompt)
    context_padded = bool((capture.attention_mask == 0).any())
    for seg_ids, seg_mask in segments(ids, mask, n_prompt, chunk if spec.repeat else None):
        # each segment on a fresh fork (appending to it leaves the capture's tensors as they are)
        cache = session.cache = capture.cache.fork()
        padded = context_padded or bool((seg_mask == 0).any())
        for start in range(0, seg_ids.shape[1], block):
            stop = min(seg_ids.shape[1], start + block)
            seen = torch.cat([capture.attention_mask, seg_mask[:, :stop]], dim=1)
            session.key_valid = seen.bool() if padded else None
            session.query_valid = seg_mask[:, start:stop].bool() if padded else None
            positions = real[:, None] + torch.arange(start, stop, device=device)[None, :]
            with compression_session(session):
                try:
                    model(input_ids=seg_ids[:, start:stop], attention_mask=seen, position_ids=positions, cache=cache,
                          use_cache=True, logits_to_keep=1)
                except ScoredEnough:
                    pass
    missing = [i for i in layers if i not in session.scores]
    if missing:
        raise UnsupportedModelError(f"layers {missing} did not go through chunkkv's attention during scoring")
    return session.scores
