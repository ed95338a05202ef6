"""The testbed model: a tiny ``LlamaForCausalLM`` (RoPE, GQA, SwiGLU)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chunkkv.testbed.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["testbed_config", "build_model", "construct_shift_heads"]


def testbed_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    rope_theta: float = 1_000_000.0,
    max_position_embeddings: int = 16384,
) -> LlamaConfig:
    """Llama config of the testbed. GQA: ``num_kv_heads < num_heads``.

    ``rope_theta`` is large relative to the training lengths (<= 2k) so the slow RoPE
    frequencies barely rotate over 8k tokens and content matching (induction) still works
    at lengths never seen in training.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
    )


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    """A freshly initialised model using SDPA attention."""
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


@torch.no_grad()
def construct_shift_heads(
    model: LlamaForCausalLM,
    offsets: tuple[int, ...] = (1, 2),
    const: float = 0.5,
    amplitude: float = 2.0,
    n_freqs: int = 8,
    seed: int = 0,
) -> None:
    """Write previous-token ("shift") heads into layer 0 of a freshly initialised model.

    Induction (find the earlier occurrence of the current token, copy what followed it) needs
    two heads in series: one that copies token ``i - k`` into position ``i`` and one that
    matches on it. From a random start both must appear together before either lowers the
    loss, which is the long plateau small models sit on. Here the first half is initialised by
    construction so training only has to find the second:

    - residual dim 0 is a constant feature (``const`` in every token embedding; it shifts all
      logits equally through the tied unembedding, so it changes no prediction);
    - token content lives in dims ``1 .. d/2-1``; each offset ``k`` gets its own subspace of
      ``head_dim`` dims in the upper half, where embeddings are zero;
    - KV group ``g`` of layer 0 becomes an offset-``offsets[g]`` head: queries and keys read only
      the constant dim, with RoPE phases chosen so the score peaks at relative position
      ``-k``; values read the token content and ``o_proj`` writes it into the subspace of ``k``.

    Everything stays trainable. Requires ``len(offsets) == num_key_value_heads`` of the model.
    """
    cfg = model.config
    d, hd = cfg.hidden_size, cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    n_kv, n_q = cfg.num_key_value_heads, cfg.num_attention_heads
    group = n_q // n_kv
    if len(offsets) != n_kv or d // 2 + n_kv * hd > d:
        raise ValueError("need one offset per KV head and room for the shift subspaces")
    g = torch.Generator().manual_seed(seed)
    half = hd // 2
    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    content = slice(1, d // 2)
    n_content = d // 2 - 1

    emb = model.model.embed_tokens.weight
    emb[:, d // 2:] = 0.0
    emb[:, 0] = const
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight.zero_()
    attn.k_proj.weight.zero_()
    attn.v_proj.weight.zero_()
    attn.o_proj.weight.zero_()
    for kv, off in enumerate(offsets):
        ks = slice(kv * hd, (kv + 1) * hd)
        for j in range(n_freqs):
            # score(m, n) = A*B*x0^2 * sum_j cos(theta_j * (m - n - off)): peaks at n = m - off.
            attn.k_proj.weight[kv * hd + j, 0] = amplitude * float(torch.cos(inv[j] * off))
            attn.k_proj.weight[kv * hd + j + half, 0] = amplitude * float(torch.sin(inv[j] * off))
        # Baseline through the slowest RoPE pair (cos ~ 1 at any distance): scores become
        # A*B*x0(m)*x0(n) * (sum_j cos(...) - (n_freqs - 0.3)), positive only at the target
        # offset, so differences in embedding norm between tokens cannot move the peak.
        attn.k_proj.weight[kv * hd + half - 1, 0] = -amplitude * (n_freqs - 0.3)
        # Random orthonormal read-out of the token content into the value vector.
        proj = torch.linalg.qr(torch.randn(n_content, hd, generator=g))[0].T  # [hd, n_content]
        attn.v_proj.weight[ks, content] = proj * 1.0
        out = slice(d // 2 + kv * hd, d // 2 + (kv + 1) * hd)
        for h in range(kv * group, (kv + 1) * group):
            for j in list(range(n_freqs)) + [half - 1]:
                attn.q_proj.weight[h * hd + j, 0] = amplitude
        # Only the first query head of the group writes; the others start silent (free to train).
        h0 = kv * group
        attn.o_proj.weight[out, h0 * hd:(h0 + 1) * hd] = torch.eye(hd)
