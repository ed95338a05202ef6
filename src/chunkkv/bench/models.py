"""Random-weight Llama models built from a config: speed and memory do not depend on the weights.

``random-100m`` (the default) has the shape the paper-style numbers in ``docs/benchmarks.md`` use:
12 layers, hidden 768, 12 query / 4 KV heads (head dim 64), SwiGLU 2048, vocabulary 16 000,
about 100M parameters. ``random-tiny`` is for tests and smoke runs (seconds on a CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a model is built: the command's --help lists the names without torch
    import torch
    from transformers import LlamaForCausalLM

RANDOM_MODELS: dict[str, dict] = {
    "random-100m": dict(
        vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4,
    ),
    "random-tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    ),
}
ALIASES = {"random": "random-100m", "random-100M": "random-100m"}
#: The methods the bench compares by default.
DEFAULT_METHODS = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv")


def is_random_model(name: str) -> bool:
    return name in RANDOM_MODELS or name in ALIASES


def random_llama(
    name: str = "random-100m",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_positions: int = 65536,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> LlamaForCausalLM:
    """A deterministic random Llama of the named shape, in eval mode.

    Args:
        dtype: default float32.
        max_positions: ``max_position_embeddings``; raise it for contexts beyond 64k.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    name = ALIASES.get(name, name)
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose one of {', '.join(RANDOM_MODELS)}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**RANDOM_MODELS[name], max_position_embeddings=max_positions)
    cfg._attn_implementation = attn_implementation
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # never stop early
    return model
