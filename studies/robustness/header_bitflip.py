"""Flip every bit of a saved context's header, one at a time, and load each damaged file.

Issue 25, item B: the checksum of a saved context (``chunkkv.persist``) used to cover the tensors
only, so a flipped bit in the metadata (a layer's ``logical_length``) loaded without a word and
decoded garbage; other flips gave a raw ``KeyError`` / ``TypeError``. Now every flip must end in one
of two ways:

* ``refused``: :class:`chunkkv.ContextFileError` (the one file error), or
* ``harmless``: the file loads and the loaded context is identical to the original (every tensor,
  every layer's lengths and flags, the method, the stats and the decode budget) — harmless by
  construction: what was loaded is what was saved.

Anything else — another exception, or a context that loads but differs — is a failure.

The context: the shipped testbed model (``models/chunkkv-testbed``, 2 layers), a 300-token prompt
compressed by ChunkKV (24 tokens, window 8, reuse depth 2) with a decode budget set, so the header
holds every kind of entry (pruned layers, aliases of shared indices, the method, the stats, the
decode budget and its recent queries). The header is the safetensors header: the 8-byte length
and the JSON after it (tensor table + metadata, padded with spaces).

    PYTHONPATH=src python studies/robustness/header_bitflip.py            # writes header_bitflip.json / .md here
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _same(a, b) -> bool:
    """The loaded context ``b`` is the saved context ``a``: every tensor, length, flag and setting."""
    if a.method != b.method or a.stats != b.stats:
        return False
    for x, y in ((a.input_ids, b.input_ids), (a.attention_mask, b.attention_mask), (a.next_logits, b.next_logits)):
        if x.dtype != y.dtype or not torch.equal(x, y):
            return False
    la, lb = a.cache.layers, b.cache.layers
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if type(x) is not type(y):
            return False
        for name in ("logical_length", "needs_wrapper", "sliding_window", "cumulative_length"):
            if getattr(x, name, None) != getattr(y, name, None):
                return False
        for name in ("keys", "values", "valid", "kept_index", "recent_queries"):
            tx, ty = getattr(x, name, None), getattr(y, name, None)
            if (tx is None) != (ty is None) or (tx is not None and (tx.dtype != ty.dtype or not torch.equal(tx, ty))):
                return False
        bx, by = getattr(x, "bound", None), getattr(y, "bound", None)
        if (bx is None) != (by is None) or (bx is not None and (bx.method, bx.keep, bx.every) != (by.method, by.keep, by.every)):
            return False
    return True


def build_context(model, tokens: int = 300, seed: int = 0, budget: bool = True):
    """A compressed context whose header holds every kind of entry (see the module docstring)."""
    import chunkkv

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    ctx = chunkkv.compress(model, ids, method=chunkkv.ChunkKV(keep_tokens=24, window=8, chunk_size=4, reuse_depth=2))
    if budget:
        chunkkv.set_decode_budget(ctx, 24, 8)
    return ctx


def sweep(model, path: Path, reference, log_every: int = 2000) -> dict:
    """Flip each bit of ``path``'s header in turn; classify each load. Returns the summary."""
    import chunkkv
    from chunkkv.persist import header_bytes

    data = path.read_bytes()
    size = header_bytes(path)
    outcomes: collections.Counter = collections.Counter()
    examples: dict[str, list] = collections.defaultdict(list)
    damaged = path.with_name("flipped.safetensors")
    start = time.perf_counter()
    n = 0
    for byte in range(size):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            damaged.write_bytes(bytes(flipped))
            try:
                loaded = chunkkv.load_context(damaged, model)
            except chunkkv.ContextFileError as exc:
                kind = "refused"
                reason = str(exc).split(": ", 1)[-1][:90]
            except Exception as exc:  # noqa: BLE001 - any other error is what the sweep looks for
                kind = f"other error ({type(exc).__name__})"
                reason = str(exc)[:120]
            else:
                kind = "harmless (loaded == saved)" if _same(reference, loaded) else "WRONG (loaded, differs)"
                reason = ""
            outcomes[kind] += 1
            if len(examples[kind]) < 3:
                examples[kind].append({"byte": byte, "bit": bit, "char": chr(data[byte]) if 32 <= data[byte] < 127
                                       else f"0x{data[byte]:02x}", "reason": reason})
            n += 1
            if log_every and n % log_every == 0:
                print(f"  {n} of {8 * size} flips, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    damaged.unlink(missing_ok=True)
    bad = sum(v for k, v in outcomes.items() if not (k == "refused" or k.startswith("harmless")))
    return {"header_bytes": size, "flips": n, "outcomes": dict(outcomes), "failures": bad,
            "examples": dict(examples), "seconds": round(time.perf_counter() - start, 1)}


def refusal_reasons(model, path: Path) -> dict[str, int]:
    """Which check refuses the flips (grouped by the start of the message's reason)."""
    import chunkkv
    from chunkkv.persist import header_bytes

    data = path.read_bytes()
    damaged = path.with_name("flipped.safetensors")
    reasons: collections.Counter = collections.Counter()
    for byte in range(header_bytes(path)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            damaged.write_bytes(bytes(flipped))
            try:
                chunkkv.load_context(damaged, model)
            except chunkkv.ContextFileError as exc:
                text = str(exc)
                for key in ("not a readable chunkkv context", "header (the chunkkv metadata) does not match",
                            "no 'chunkkv_sha256' checksum", "not a chunkkv context", "tensors do not match",
                            "not valid JSON", "malformed", "another model", "format version"):
                    if key in text:
                        reasons[key] += 1
                        break
                else:
                    reasons[text[:60]] += 1
            except Exception:  # noqa: BLE001
                pass
    damaged.unlink(missing_ok=True)
    return dict(reasons)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "chunkkv-testbed"))
    parser.add_argument("--out", default=str(HERE), help="folder for header_bitflip.json / .md (default: here)")
    parser.add_argument("--no-budget", action="store_true",
                        help="no decode budget (to run the same sweep on a chunkkv that cannot save one)")
    args = parser.parse_args(argv)
    import chunkkv

    torch.set_num_threads(1)
    model, _ = chunkkv.load_pretrained(args.model, device="cpu")
    ctx = build_context(model, budget=not args.no_budget)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ctx.safetensors"
        ctx.save(path, model)
        reference = chunkkv.load_context(path, model)
        assert _same(reference, reference) and (args.no_budget or reference.cache.decode_budget is not None)
        summary = sweep(model, path, reference)
        summary["refused_by"] = refusal_reasons(model, path)
    summary["context"] = {"model": Path(args.model).name, "prompt_tokens": 300,
                          "method": ctx.method.describe(), "decode_budget": "none" if args.no_budget else "24 (every 8)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "header_bitflip.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"Every single-bit flip of a saved context's header ({summary['header_bytes']} bytes, "
             f"{summary['flips']} flips; {summary['context']['model']}, {summary['context']['method']}, "
             f"decode budget {summary['context']['decode_budget']}):", "", "| outcome | flips |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary["outcomes"].items())]
    lines += ["", "Refused by:", "", "| check | flips |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(summary["refused_by"].items(), key=lambda kv: -kv[1])]
    lines += ["", f"failures (another error, or a context that loads but differs): {summary['failures']}"]
    (out / "header_bitflip.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
