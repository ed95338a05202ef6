"""Share of prefill time spent in chunkkv's compression step, reuse depth 1 vs 2, in one run.

    python benchmarks/prefill_overhead.py --length 4096 --repeats 3

Builds a ~100M-parameter random Llama (speed does not depend on the weights), runs the full-cache
prefill and ChunkKV prefills with ``measure=True`` (times scoring + selection + gather per layer),
and prints medians and ratios as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import chunkkv


def random_llama_100m(dtype=torch.float32, device="cpu") -> LlamaForCausalLM:
    """12 layers, hidden 768, 12 query / 4 KV heads, SwiGLU 2048, vocab 16k: ~100M parameters."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=65536,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep-fraction", type=float, default=0.1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    model = random_llama_100m(getattr(torch, args.dtype), args.device)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 16000, (1, args.length), generator=torch.Generator().manual_seed(1)).to(args.device)
    configs = {
        "full": chunkkv.FullKV(),
        "chunkkv_reuse1": chunkkv.ChunkKV(keep_fraction=args.keep_fraction, reuse_depth=1),
        "chunkkv_reuse2": chunkkv.ChunkKV(keep_fraction=args.keep_fraction, reuse_depth=2),
        "snapkv": chunkkv.SnapKV(keep_fraction=args.keep_fraction),
    }
    chunkkv.compress(model, ids[:, :512], method=configs["chunkkv_reuse1"])  # warm-up
    runs: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "select": []} for k in configs}
    for _ in range(args.repeats):  # interleaved so drift hits every config alike
        for name, method in configs.items():
            ctx = chunkkv.compress(model, ids, method=method, measure=True)
            runs[name]["prefill"].append(ctx.stats.prefill_seconds)
            runs[name]["select"].append(ctx.stats.select_seconds)
    out = {"params_millions": round(params / 1e6, 1), "length": args.length, "device": args.device,
           "threads": torch.get_num_threads(), "repeats": args.repeats}
    full = statistics.median(runs["full"]["prefill"])
    for name, r in runs.items():
        pre, sel = statistics.median(r["prefill"]), statistics.median(r["select"])
        out[name] = {"prefill_s": round(pre, 3), "compress_s": round(sel, 4),
                     "compress_share_of_prefill": round(sel / pre, 4), "prefill_vs_full": round(pre / full, 4)}
    out["compress_time_ratio_reuse2_over_reuse1"] = round(
        out["chunkkv_reuse2"]["compress_s"] / out["chunkkv_reuse1"]["compress_s"], 3
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
