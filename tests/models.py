"""Tiny random-weight models of each supported family, and the masked ground-truth forward."""

from __future__ import annotations

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096, head_dim=16,
)


def random_prompt(batch: int = 1, length: int = 120, seed: int = 0) -> torch.Tensor:
    """``[batch, length]`` random token ids (deterministic in ``seed``; drawn on the CPU, then moved to
    the default device so ``CHUNKKV_TEST_DEVICE`` runs see the same ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g, device="cpu").to(torch.get_default_device())


def left_padded(lengths, seed: int = 20) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(rows, ids, mask)``: one random row per length, left-padded with 0 into ``[B, max(lengths)]``."""
    rows = [random_prompt(1, n, seed=seed + n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return rows, ids, mask


def tiny_model(family: str = "llama", seed: int = 0, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    """A deterministic random model of ``family`` in float32, eval mode."""
    torch.manual_seed(seed)
    kw = {**COMMON, **overrides}
    if family == "llama":
        cfg = transformers.LlamaConfig(**kw)
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(**{"sliding_window": None, **kw})
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(use_sliding_window=False, **kw)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(use_sliding_window=False, **kw)
        cls = transformers.Qwen3ForCausalLM
    elif family == "phi3":
        kw.pop("head_dim")
        cfg = transformers.Phi3Config(**{"sliding_window": None, "pad_token_id": 0, **kw})
        cls = transformers.Phi3ForCausalLM
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(**{"sliding_window": 4096, **kw})
        cls = transformers.Gemma2ForCausalLM
        attn = "eager"  # Gemma 2 soft-caps logits, which sdpa cannot do
    elif family == "gemma3":
        layer_types = ["sliding_attention", "full_attention"] * 2  # mixed, as in real Gemma 3
        cfg = transformers.Gemma3TextConfig(**{"sliding_window": 4096, "layer_types": layer_types, **kw})
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    model.generation_config.eos_token_id = None  # random models: never stop early
    model.generation_config.pad_token_id = 0
    return model


# --- ground truth: full attention with evicted prompt tokens masked for new queries -------------
_TRUTH: dict = {}


def _truth_attention(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """Eager attention over every token, with per-(layer, kv-head) evictions applied to the queries
    that come after the prompt. ``_TRUTH`` holds ``prompt_len`` and ``kept[layer] = [B, Hkv, T]``."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).double()
    v = value.repeat_interleave(groups, dim=1).double()
    logits = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    q_len, kv_len = query.shape[2], key.shape[2]
    allowed = torch.ones(query.shape[0], query.shape[1], q_len, kv_len, dtype=torch.bool)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()
    else:
        allowed = allowed & torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    evicted_after = _TRUTH.get("evicted_after", {}).get(module.layer_idx)
    if evicted_after is not None:
        # Query p sees key j only while j was held: p <= the last position processed before j's eviction.
        last = evicted_after.repeat_interleave(groups, dim=1)[:, :, None, :kv_len]  # [B, Hq, 1, T]
        q_pos = torch.arange(kv_len - q_len, kv_len)[None, None, :, None]
        allowed = allowed & (q_pos <= last)
    kept = _TRUTH["kept"].get(module.layer_idx)
    if kept is not None:
        prompt = _TRUTH["prompt_len"]
        evicted = ~kept.repeat_interleave(groups, dim=1)  # [B, Hq, T]
        block = torch.zeros_like(allowed)
        block[:, :, prompt:, :prompt] = evicted[:, :, None, :]
        allowed = allowed & ~block
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(logits, dim=-1), v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("truth", _truth_attention)
AttentionMaskInterface.register("truth", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def kept_masks(cache, prompt_len: int) -> dict[int, torch.Tensor]:
    """``{layer: [B, Hkv, prompt_len] bool}`` of the prompt tokens each pruned layer kept."""
    out = {}
    for i in cache.pruned_layers:
        layer = cache.layers[i]
        if layer.kept_index is None:
            continue
        index = layer.kept_index
        batch, heads = layer.keys.shape[0], layer.keys.shape[1]
        index = index.expand(batch, heads, -1)
        valid = layer.valid[:, : index.shape[-1]] if layer.valid is not None else torch.ones_like(index[:, 0], dtype=torch.bool)
        mask = torch.zeros(batch, heads, prompt_len, dtype=torch.bool)
        mask.scatter_(-1, index, valid[:, None, :].expand(-1, heads, -1))
        out[i] = mask
    return out


@torch.inference_mode()
def _truth_forward(model, ids: torch.Tensor, attention_mask: torch.Tensor, **truth) -> torch.Tensor:
    """One full forward through the ground-truth attention with ``truth`` as its state."""
    previous = model.config._attn_implementation
    _TRUTH.update(truth)
    model.set_attn_implementation("truth")
    try:
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=positions).logits
    finally:
        model.set_attn_implementation(previous)
        _TRUTH.pop("evicted_after", None)


def truth_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, kept) -> torch.Tensor:
    """Logits of a full forward over ``ids`` where post-prompt queries cannot see evicted tokens."""
    return _truth_forward(model, ids, attention_mask, prompt_len=prompt_len, kept=kept)


def assert_decodes_like_truth(model, ctx, ids: torch.Tensor, question: torch.Tensor, new_tokens: int = 6):
    """Extending ``ctx`` (compressed from ``ids``) with ``question`` gives the logits of the full
    forward in which the evicted prompt tokens are masked, and stock ``generate`` on its cache gives
    the library loop's ``new_tokens`` tokens. Returns ``(logits, full ids, kept masks)``."""
    import chunkkv

    prompt = ids.shape[1]
    kept = kept_masks(ctx.cache, prompt)
    got = chunkkv.extend(model, ctx.fork(), question)
    full = torch.cat([ids, question], 1)
    want = truth_logits(model, full, torch.ones_like(full), prompt, kept)[:, prompt:]
    torch.testing.assert_close(got, want.to(got.dtype), atol=2e-5, rtol=1e-4)
    ours = chunkkv.continue_from(model, ctx, question, chunkkv.Sampling(max_new_tokens=new_tokens))
    stock = model.generate(full, cache=ctx.cache, max_new_tokens=new_tokens, do_sample=False)[:, full.shape[1]:]
    assert torch.equal(ours, stock)
    return got, full, kept


# --- eviction over time: chunked prefill and decoding budgets -----------------------------------
NEVER = 1 << 40


class EvictionLog:
    """Records every :meth:`PrunedLayer.prune` (monkeypatched) to rebuild, per layer, row and KV
    head, the last position processed before each position was evicted (``NEVER`` if still held)."""

    def __init__(self, monkeypatch) -> None:
        from chunkkv.cache import PrunedLayer

        self.events = []
        self.max_stored: dict[int, int] = {}
        original = PrunedLayer.prune
        log = self

        def prune(layer, index, valid):
            before = layer.slot_positions()
            valid_before = layer.valid
            stored = layer.stored_length
            original(layer, index, valid)
            log.max_stored[id(layer)] = max(log.max_stored.get(id(layer), 0), stored)
            log.events.append((id(layer), layer.logical_length - 1, before, valid_before, layer.kept_index, layer.valid))

        monkeypatch.setattr(PrunedLayer, "prune", prune)

    def evicted_after(self, cache, total: int) -> dict[int, torch.Tensor]:
        """``{layer: [B, Hkv, total] long}`` for the layers of ``cache`` (the same layer objects: pass a
        context's own ``ctx._cache``, not ``ctx.cache``, which is a fork)."""
        index_of = {id(layer): i for i, layer in enumerate(cache.layers)}
        out: dict[int, torch.Tensor] = {}
        for lid, last, before, valid_before, after, valid_after in self.events:
            if lid not in index_of:
                continue  # another cache's layer
            i = index_of[lid]
            layer = cache.layers[i]
            batch, heads = layer.keys.shape[0], layer.keys.shape[1]
            table = out.setdefault(i, torch.full((batch, heads, total), NEVER, dtype=torch.long))
            held = _present(before, valid_before, batch, heads, total)
            kept = _present(after, valid_after, batch, heads, total)
            gone = held & ~kept & (table == NEVER)
            table[gone] = last
        return out

    def stored_peak(self, cache) -> list[int]:
        """Most slots each pruned layer of ``cache`` held right before a pruning."""
        return [self.max_stored.get(id(cache.layers[i]), 0) for i in cache.pruned_layers]


def _present(positions, valid, batch, heads, total) -> torch.Tensor:
    positions = positions.expand(batch, heads, -1)
    ok = torch.ones(batch, positions.shape[-1], dtype=torch.long) if valid is None else valid.long()
    count = torch.zeros(batch, heads, total, dtype=torch.long)
    count.scatter_add_(-1, positions, ok[:, None, :].expand(-1, heads, -1).contiguous())
    return count > 0


def timed_truth_logits(model, ids: torch.Tensor, attention_mask: torch.Tensor, evicted_after) -> torch.Tensor:
    """Logits of a full forward where each query sees a key only while it was held (see EvictionLog)."""
    return _truth_forward(model, ids, attention_mask, prompt_len=ids.shape[1], kept={}, evicted_after=evicted_after)
