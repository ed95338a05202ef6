"""A testbed ``LlamaForCausalLM`` whose weights are written BY CONSTRUCTION, not trained.

Why: on the 2-core CPU budget no trained model got past the induction-head plateau (see
``docs/testbed.md``). This module writes the circuit such a model would learn directly into
the weights of a standard Llama (RoPE, GQA, SwiGLU, RMSNorm). Nothing is special-cased at run
time: attention is computed by transformers as usual, so a KV-cache compression method that
evicts the needle tokens breaks the model exactly as it would break a trained one.

Residual stream layout (``hidden_size = 296``, ``head_dim = 128``, 8 query / 4 KV heads)::

    dim 0        constant (every token embedding holds CONST there)
    C   1..48    token code (a 48-d, nearly orthogonal unit vector per token)
    S1  49..96   code of the token 1 position back   (written by layer 0)
    S2  97..144  code of the token 2 positions back  (layer 0)
    S4  145..192 code of the token 4 positions back  (layer 0)
    S6  193..240 code of the token 6 positions back  (layer 0)
    OUT 241..288 code of the token to predict        (written by layer 1, read by lm_head)
    289          BOS flag (attention sink of the "resume" head)

Layer 0: KV group g is a shift head with offset (1, 2, 4, 6)[g]. Its queries and keys read only
the constant dim; RoPE phases are chosen so the score peaks at relative position -offset (a
baseline on the slowest RoPE pair makes every other position score negative, whatever the
token norms). Values copy the token code into S_offset.

Layer 1 (RoPE angles are negligible on head dims 16..63 / 80..127 with ``rope_theta=1e30``,
so content matching there works at any distance):

- head A, *bigram induction*: attends to the position j whose two preceding tokens equal the
  current and the previous token (``C_i . S1_j + S1_i . S2_j``), copies token j into OUT.
  After ``... zan pol is`` it lands on the value that follows ``zan pol is`` in the needle and
  then copies the rest of the value token by token.
- head B, *resume*: only at ``.`` tokens (elsewhere it parks on BOS): attends to j with
  ``S4_j = S6_i`` and ``S2_j = code("?")``, i.e. to the entry after the one just answered in the
  question's fill-in list ``k is ? . k' is ? .``, and copies it (with twice head A's weight).
  This is how multi-query / multi-value answers move on to the next item.

MLPs are zero (SwiGLU present, contributes nothing). ``lm_head`` row t is ``code_t`` on OUT
(rows of special tokens and ``?`` are zero, so the placeholder is never emitted).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chunkkv.testbed.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, build_tokenizer

__all__ = ["construct_config", "construct_model", "token_codes"]

CODE = 48
HEAD_DIM = 128
HIDDEN = 296
OFFSETS = (1, 2, 4, 6)
CONST = 4.0
ROPE_THETA = 1e30
PREV_W = 0.5
# Head dims whose RoPE angle stays below ~3e-4 rad over 8k tokens (pairs 16..63).
FREE_LO = list(range(16, 64))
FREE_HI = [j + HEAD_DIM // 2 for j in FREE_LO]

_C = slice(1, 1 + CODE)
_S = {k: slice(1 + CODE * (i + 1), 1 + CODE * (i + 2)) for i, k in enumerate(OFFSETS)}
_OUT = slice(1 + CODE * 5, 1 + CODE * 6)
_FLAG = 1 + CODE * 6


def construct_config(vocab_size: int) -> LlamaConfig:
    """Config of the constructed testbed (2 layers, GQA 8/4, head_dim 128)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=HEAD_DIM,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def token_codes(n: int, dim: int = CODE, seed: int = 0, steps: int = 300) -> torch.Tensor:
    """``n`` unit vectors in ``dim`` dims with low mutual coherence (a few hundred steps of
    gradient descent on a soft maximum of the pairwise |cos|, from a random start)."""
    g = torch.Generator().manual_seed(seed)
    # One thread and float64 so the result is bit-identical across machines/thread counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            x = _spread(torch.randn(n, dim, generator=g, dtype=torch.float64), steps)
    finally:
        torch.set_num_threads(threads)
    return x.float()


def _spread(x: torch.Tensor, steps: int) -> torch.Tensor:
    n = x.shape[0]
    x = x / x.norm(dim=1, keepdim=True)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.01)
    eye = torch.eye(n, dtype=torch.bool)
    for _ in range(steps):
        u = x / x.norm(dim=1, keepdim=True)
        c = (u @ u.T).masked_fill(eye, 0.0)
        loss = torch.logsumexp(20 * c.abs().flatten(), 0) / 20 + (c ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (x / x.norm(dim=1, keepdim=True)).detach()


@torch.no_grad()
def construct_model(seed: int = 0) -> LlamaForCausalLM:
    """Build the constructed testbed model (see the module docstring for the circuit)."""
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    V = tok.get_vocab_size()
    cfg = construct_config(V)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.zero_()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)

    codes = token_codes(V, seed=seed)
    n_special = len(SPECIAL_TOKENS)
    codes[:n_special] = 0.0  # specials carry no content (BOS is recognised by its flag)
    q_mark, dot = vocab["?"], vocab["."]

    # ---- embeddings and unembedding
    E = model.model.embed_tokens.weight
    E[:, 0] = CONST
    E[:, _C] = codes
    E[BOS_ID, _FLAG] = 1.0
    U = model.lm_head.weight
    U[:, _OUT] = 8.0 * codes
    U[:n_special] = 0.0
    U[q_mark] = 0.0

    d = HIDDEN
    scale = 1.0 / math.sqrt(HEAD_DIM)
    half = HEAD_DIM // 2
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    # RMS of the residual entering layer 0 / layer 1 (token codes are unit vectors; the BOS
    # flag changes it a little only at position 0).
    rms0 = math.sqrt((CONST**2 + 1.0) / d)
    rms1 = math.sqrt((CONST**2 + 1.0 + len(OFFSETS)) / d)
    x0 = CONST / rms0

    # ---- layer 0: shift heads
    att = model.model.layers[0].self_attn
    n_freqs, amp = 9, 1.5
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    for g, off in enumerate(OFFSETS):
        kb = g * HEAD_DIM
        for j in range(n_freqs):
            att.k_proj.weight[kb + j, 0] = amp * math.cos(inv[j] * off)
            att.k_proj.weight[kb + j + half, 0] = amp * math.sin(inv[j] * off)
        att.k_proj.weight[kb + half - 1, 0] = -amp * (n_freqs - 0.3)
        for h in range(g * group, (g + 1) * group):
            for j in list(range(n_freqs)) + [half - 1]:
                att.q_proj.weight[h * HEAD_DIM + j, 0] = amp
        # Values: the token code, undoing the input RMSNorm so S_k holds unit vectors.
        att.v_proj.weight[kb:kb + CODE, _C] = torch.eye(CODE) * rms0
        h0 = g * group
        att.o_proj.weight[_S[off], h0 * HEAD_DIM:h0 * HEAD_DIM + CODE] = torch.eye(CODE)
    assert amp**2 * x0**2 * scale * 0.5 > 15, "shift heads not sharp enough"

    # ---- layer 1: bigram induction (group 0) and resume (group 1)
    att = model.model.layers[1].self_attn
    lo, hi = FREE_LO, FREE_HI
    alpha = 5.0

    def put(proj: torch.nn.Linear, row0: int, rows: list[int], cols: slice, mult: float) -> None:
        for r, c in zip(rows, range(cols.start, cols.stop)):
            proj.weight[row0 + r, c] = mult

    # Head A: q = [C_i ; PREV_W * S1_i], k = [S1_j ; S2_j], v = C_j. The previous-token term
    # weighs less than the current-token one, so when no full bigram exists (first syllable
    # of a name just produced by head C) plain induction on the current token wins the tie.
    for h in range(0, group):
        put(att.q_proj, h * HEAD_DIM, lo, _C, alpha)
        put(att.q_proj, h * HEAD_DIM, hi, _S[1], alpha * PREV_W)
    put(att.k_proj, 0, lo, _S[1], alpha)
    put(att.k_proj, 0, hi, _S[2], alpha)
    att.v_proj.weight[0:CODE, _C] = torch.eye(CODE) * rms1
    att.o_proj.weight[_OUT, 0:CODE] = torch.eye(CODE) * 1.0

    # Head B: q = [S6_i ; marker ; sink gate], k = [S4_j ; code(?).S2_j ; BOS flag], v = C_j.
    kb = 1 * HEAD_DIM
    match = alpha**2 / rms1**2 * scale  # logit of one full code match (~1.0 dot product)
    for h in range(group, 2 * group):
        qb = h * HEAD_DIM
        put(att.q_proj, qb, lo[:CODE], _S[6], alpha)
        # Marker term: constant query x (code(?) . S2_j) key, worth one full code match.
        att.q_proj.weight[qb + hi[0], 0] = 1.0
        # Sink gate: large for every current token except "." (whose code cancels it).
        att.q_proj.weight[qb + hi[1], 0] = 1.0
        att.q_proj.weight[qb + hi[1], _C] = -codes[dot] * (CONST / 1.0)
    put(att.k_proj, kb, lo[:CODE], _S[4], alpha)
    x1 = CONST / rms1
    att.k_proj.weight[kb + hi[0], _S[2]] = codes[q_mark] * match / (x1 / rms1 * scale)
    # At BOS the flag (1/rms1 after the norm) meets the gate (x1 * (1 - code_i . code_.)).
    sink = 3.0 * match
    att.k_proj.weight[kb + hi[1], _FLAG] = sink / (x1 / rms1 * scale)
    att.v_proj.weight[kb:kb + CODE, _C] = torch.eye(CODE) * rms1
    att.o_proj.weight[_OUT, group * HEAD_DIM:group * HEAD_DIM + CODE] = torch.eye(CODE) * 2.0

    # Head C, *assignment follow* (variable tracking): same bigram match as head A, plus two
    # marker terms (token j is "." and token j-4 is "="), i.e. j is the end of a line
    # ``var X = var <bigram> .`` or ``var X = value <bigram> .``; it copies X's first syllable
    # (6 back, S6_j). A sink on BOS worth 3.5 matches keeps it silent unless all 4 terms hit.
    kb = 2 * HEAD_DIM
    eq = vocab["="]
    m1, m2, m3 = 12, 13, 14  # slow RoPE pairs (angle < 0.2 rad at 8k), outside lo/hi
    for h in range(2 * group, 3 * group):
        qb = h * HEAD_DIM
        put(att.q_proj, qb, lo, _C, alpha)
        put(att.q_proj, qb, hi, _S[1], alpha)
        for m in (m1, m2, m3):
            att.q_proj.weight[qb + m, 0] = 1.0
    put(att.k_proj, kb, lo, _S[1], alpha)
    put(att.k_proj, kb, hi, _S[2], alpha)
    att.k_proj.weight[kb + m1, _C] = codes[dot] * match / (x1 / rms1 * scale)
    att.k_proj.weight[kb + m2, _S[4]] = codes[eq] * match / (x1 / rms1 * scale)
    att.k_proj.weight[kb + m3, _FLAG] = 3.5 * match / (x1 / rms1 * scale)
    att.v_proj.weight[kb:kb + CODE, _S[6]] = torch.eye(CODE) * rms1
    h0 = 2 * group
    att.o_proj.weight[_OUT, h0 * HEAD_DIM:h0 * HEAD_DIM + CODE] = torch.eye(CODE) * 2.0

    model.generation_config.do_sample = False
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


def save_constructed(out: str | Path, seed: int = 0) -> Path:
    """Construct the model and save it (weights, config, tokenizer, generation config)."""
    from chunkkv.testbed.train import save_model

    out = Path(out)
    save_model(construct_model(seed), out)
    return out
