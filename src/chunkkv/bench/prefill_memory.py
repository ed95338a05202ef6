"""Peak prefill memory of full, one-shot and chunked compression, with the computed bound beside it.

``chunkkv bench --prefill-memory`` runs, for each prompt length, the full cache, one-shot ChunkKV
and chunked ChunkKV (``prefill_chunk`` = each ``C``) at a fixed kept size, and records the peak
memory above what was live before the prefill (the bench's :class:`MemoryMeter`: CPU peak RSS or
CUDA max allocated) and the prefill time. Full and one-shot prefill attend over the whole prompt
(their activations grow with it, quadratically for the attention mask on CPU), so they only run up
to ``quadratic_limit`` tokens; chunked prefill attends over ``kept + C`` keys only.

The computed bound for chunked prefill (:func:`chunked_bound`) is what must be live at the peak:
every layer's K/V for ``kept + C`` tokens, plus one chunk's prefill activations.

Results are appended to ``prefill_memory.jsonl`` (resumable: finished rows are skipped), under
the rule of every resumable store (:class:`chunkkv.outputs.ResumableStore`).

The prefill time each row records is taken in this memory run, after the meter fixed glibc's mmap
threshold (:mod:`chunkkv.bench.measure`): every large tensor is then fresh pages, which makes CPU
prefills slower than in a user's process (row field ``time_allocator``). They compare the modes
with each other; speed figures come from ``chunkkv bench``, whose timings run first, with the
default allocator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..pipeline import compress
from ..outputs import ResumableStore
from ..methods import ChunkKV, FullKV
from .measure import MiB, MemoryMeter, allocator_state, now


def chunked_bound(config, kept: int, chunk: int, batch: int = 1, element_size: int = 4) -> dict[str, int]:
    """Bytes that must be live at the peak of a chunked prefill, by parts.

    * ``kv``: every layer's keys and values for ``kept + chunk`` tokens (an upper bound: at any
      moment only the layer being run holds ``kept + chunk``, the others ``kept``);
    * ``activations``: one chunk through one layer: the residual stream, its normed copy, q, the
      attention output and o-projection, k and v (``6 * hidden`` per token), the MLP's gate, up and
      product (``3 * intermediate``); the keys and values repeated to every query head for GQA
      (``2 * heads * (kept + chunk) * head_dim``); the boolean mask (``chunk * (kept + chunk)``
      bytes); the window scores of the re-selection (``heads * 32 * (kept + chunk)`` floats). The
      attention weights are not counted: sdpa's fused CPU and CUDA kernels do not materialise them.
    """
    text = config.get_text_config(decoder=True)
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    keys = kept + chunk
    kv = layers * 2 * batch * kv_heads * keys * head_dim * element_size
    per_token = 6 * text.hidden_size + 3 * text.intermediate_size
    activations = batch * (
        element_size * (chunk * per_token + 2 * heads * keys * head_dim + heads * 32 * keys) + chunk * keys
    )
    return {"kv": kv, "activations": activations, "total": kv + activations}


def _modes(chunks: list[int]) -> list[tuple[str, int | None]]:
    return [("full", None), ("one-shot", None)] + [("chunked", c) for c in chunks]


#: Report files written beside ``prefill_memory.jsonl``.
REPORTS = ("prefill_memory.md", "prefill_memory.png")


def _row_id(row: dict[str, Any]) -> tuple:
    return (row["context"], row["mode"], row["chunk"])


def prefill_memory_store(out_dir: str | Path, *, model: str, dtype: str, device: str, kept: int, seed: int,
                         threads: int, overwrite: bool = False) -> ResumableStore:
    """The folder's ``prefill_memory.jsonl`` (:class:`chunkkv.outputs.ResumableStore`): a rerun with
    another model, dtype, device, kept size, seed or thread count is refused; more contexts or
    chunk sizes widen the plan."""
    settings = {"task": "prefill-memory", "model": model, "dtype": dtype, "device": device, "kept": kept, "seed": seed,
                "threads": threads}
    return ResumableStore(out_dir, "prefill_memory.jsonl", settings, key="mode", ident=_row_id, overwrite=overwrite,
                          outputs=REPORTS, legacy=lambda row: {"kept": row["kept"]} if "kept" in row else None,
                          restart="delete its prefill_memory.* files to start over")


def run_prefill_memory(
    model: torch.nn.Module,
    contexts: list[int],
    chunks: list[int],
    kept: int,
    out_dir: str | Path | None = None,
    *,
    quadratic_limit: int = 16384,
    chunked_limit: int | None = None,
    seed: int = 0,
    store: ResumableStore | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure every (context, mode) once and append it to ``out_dir/prefill_memory.jsonl``.

    Args:
        contexts: prompt lengths; ``chunks``: the ``C`` values of chunked prefill.
        kept: tokens kept per layer (``ChunkKV(keep_tokens=kept)``, chunk size 10, window 32).
        quadratic_limit: longest prompt for the full cache and one-shot ChunkKV.
        chunked_limit: longest prompt for chunked prefill with ``C`` other than the middle value
            (None = no limit): saves time at the longest lengths.
        store: :func:`prefill_memory_store` already open (the CLI opens it before loading the model);
            default: one for ``out_dir`` with this model's settings.

    Returns the rows of this run's plan, each once.
    """
    device = next(model.parameters()).device
    if store is None:
        if out_dir is None:
            raise ValueError("run_prefill_memory needs out_dir (or an open store)")
        store = prefill_memory_store(
            out_dir, model=str(getattr(model, "name_or_path", "") or type(model).__name__),
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""), device=device.type, kept=kept, seed=seed,
            threads=torch.get_num_threads())
    method = ChunkKV(keep_tokens=kept)
    middle = sorted(chunks)[len(chunks) // 2]
    plan = [(context, mode, chunk) for context in contexts for mode, chunk in _modes(chunks)
            if not (mode != "chunked" and context > quadratic_limit)
            and not (mode == "chunked" and chunked_limit is not None and context > chunked_limit and chunk != middle)]
    with store:
        todo = set(store.plan(plan))
        meter = MemoryMeter(device)
        vocab = model.config.get_text_config(decoder=True).vocab_size
        for context in contexts:
            if not any(item[0] == context for item in todo):
                continue
            ids = torch.randint(1, vocab, (1, context), generator=torch.Generator().manual_seed(seed + context)).to(device)
            for mode, chunk in _modes(chunks):
                if (context, mode, chunk) not in todo:
                    continue
                base = meter.current()
                meter.reset_peak()
                start = now(device)
                ctx = compress(
                    model, ids, method=FullKV() if mode == "full" else method,
                    prefill_chunk=chunk if mode == "chunked" else None,
                )
                seconds = now(device) - start
                peak = meter.peak() - base
                bound = chunked_bound(model.config, kept, chunk) if chunk else None
                row = {
                    "context": context, "mode": mode, "chunk": chunk, "kept": kept,
                    "peak_mib": round(peak / MiB, 1), "prefill_s": round(seconds, 3),
                    "kv_mib": round(ctx.cache.nbytes() / MiB, 1),
                    "bound_mib": round(bound["total"] / MiB, 1) if bound else None,
                    "bound_kv_mib": round(bound["kv"] / MiB, 1) if bound else None,
                    "meter": meter.method, "time_allocator": allocator_state(), "threads": torch.get_num_threads(),
                    "time": time.time(),
                }
                del ctx
                store.append(row)
                log(f"{context} {mode}{'' if chunk is None else f' C={chunk}'}: peak {row['peak_mib']} MiB above "
                    f"the weights, prefill {row['prefill_s']} s" + (f", bound {row['bound_mib']} MiB" if bound else ""))
        wanted = set(plan)
        return [r for r in store.load() if _row_id(r) in wanted]


def report(rows: list[dict[str, Any]]) -> str:
    """Markdown: peak MiB per context and mode (bound in brackets), and chunked / one-shot time ratios."""
    contexts = sorted({r["context"] for r in rows})
    modes = sorted({(r["mode"], r["chunk"]) for r in rows}, key=lambda m: (["full", "one-shot", "chunked"].index(m[0]), m[1] or 0))
    label = lambda m: m[0] if m[1] is None else f"chunked C={m[1]}"  # noqa: E731
    by = {(r["context"], r["mode"], r["chunk"]): r for r in rows}
    lines = ["| prompt | " + " | ".join(label(m) for m in modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for c in contexts:
        cells = []
        for m in modes:
            r = by.get((c, *m))
            if r is None:
                cells.append("not run")
            elif r["bound_mib"] is not None:
                cells.append(f"{r['peak_mib']:.0f} (bound {r['bound_mib']:.0f})")
            else:
                cells.append(f"{r['peak_mib']:.0f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Prefill seconds (chunked / one-shot), taken in this memory run: on CPU glibc's mmap threshold is "
              "fixed here, which slows every prefill against a user's process; compare the modes with each other, and "
              "take speed figures from `chunkkv bench`:", "", "| prompt | " + " | ".join(label(m) for m in modes) + " |",
              "|---" * (len(modes) + 1) + "|"]
    for c in contexts:
        one = by.get((c, "one-shot", None))
        cells = []
        for m in modes:
            r = by.get((c, *m))
            if r is None:
                cells.append("—")
            elif m[0] == "chunked" and one is not None:
                cells.append(f"{r['prefill_s']:.1f} ({r['prefill_s'] / one['prefill_s']:.2f}x)")
            else:
                cells.append(f"{r['prefill_s']:.1f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Peak memory vs prompt length per mode (log-log), computed bounds dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = sorted({(r["mode"], r["chunk"]) for r in rows}, key=lambda m: (m[0], m[1] or 0))
    for mode, chunk in modes:
        pts = sorted((r["context"], r["peak_mib"], r["bound_mib"]) for r in rows if (r["mode"], r["chunk"]) == (mode, chunk))
        name = mode if chunk is None else f"chunked C={chunk}"
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)[0]
        if chunk is not None:
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ls="--", color=line.get_color(), alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("peak memory above weights (MiB)")
    ax.set_title("Prefill peak memory, KV 1024 (dashed: computed bound for chunked)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
