"""Write a tiny random Llama as a GGUF file with gguf's own writer (for the loading tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "Ġ", "ab", "th", "the"]
MERGES = ["a b", "t h", "th e"]
CONFIG = dict(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64, context=512, rope_theta=10000.0, eps=1e-5)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (transformers undoes it when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path, seed: int = 0, architecture: str = "llama") -> dict[str, np.ndarray]:
    """Write the GGUF file and return the weights under their transformers names (float32)."""
    import gguf

    c = CONFIG
    rng = np.random.default_rng(seed)
    head_dim = c["hidden"] // c["heads"]
    vocab = len(TOKENS)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rand(vocab, c["hidden"]), "model.norm.weight": 1 + rand(c["hidden"])}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        hf[p + "self_attn.q_proj.weight"] = rand(c["heads"] * head_dim, c["hidden"])
        hf[p + "self_attn.k_proj.weight"] = rand(c["kv_heads"] * head_dim, c["hidden"])
        hf[p + "self_attn.v_proj.weight"] = rand(c["kv_heads"] * head_dim, c["hidden"])
        hf[p + "self_attn.o_proj.weight"] = rand(c["hidden"], c["heads"] * head_dim)
        hf[p + "mlp.gate_proj.weight"] = rand(c["ffn"], c["hidden"])
        hf[p + "mlp.up_proj.weight"] = rand(c["ffn"], c["hidden"])
        hf[p + "mlp.down_proj.weight"] = rand(c["hidden"], c["ffn"])
        hf[p + "input_layernorm.weight"] = 1 + rand(c["hidden"])
        hf[p + "post_attention_layernorm.weight"] = 1 + rand(c["hidden"])

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_block_count(c["layers"])
    writer.add_context_length(c["context"])
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (vocab - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for name, w in hf.items():
        if name in names:
            writer.add_tensor(names[name], w)
            continue
        layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
        if rest == "self_attn.q_proj":
            w = _permute(w, c["heads"])
        elif rest == "self_attn.k_proj":
            w = _permute(w, c["kv_heads"])
        writer.add_tensor(f"blk.{layer}.{per_layer[rest]}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf
