"""The dense reference a compressed engine request must match token for token.

One request, alone, through the plain model with a :class:`transformers.DynamicCache`: a full prefill,
then the cache cut to the prompt positions the engine kept (every layer the same positions), then
greedy decoding with position ids that continue from the prompt length (the original positions).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def dense_greedy(model, prompt_ids: list[int], kept_positions: list[int] | None, max_new_tokens: int,
                 eos_token_id: int | list[int] | None = None, first_position: int | None = None) -> list[int]:
    """Greedy tokens of ``prompt_ids`` when only ``kept_positions`` (None: all) stay in the cache after prefill.

    ``first_position``: the position of the first generated token (default: the prompt length, i.e.
    the original positions; tests pass the stored length to show that positions matter)."""
    from transformers import DynamicCache

    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
    if kept_positions is not None:
        index = torch.tensor(kept_positions, device=device)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(2, index)
            layer.values = layer.values.index_select(2, index)
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    out: list[int] = []
    position = len(prompt_ids) if first_position is None else first_position
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        out.append(token)
        if token in eos or len(out) == max_new_tokens:
            break
        step = model(input_ids=torch.tensor([[token]], device=device), position_ids=torch.tensor([[position]], device=device),
                     cache=cache, use_cache=True)
        logits = step.logits[0, -1]
        position += 1
    return out
