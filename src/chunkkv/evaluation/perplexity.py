"""Perplexity under compression: teacher-forced NLL per token through a bounded cache.

``chunkkv eval --task ppl`` (StreamingLLM's first test of a KV policy): long texts (the Paul Graham
essays joined to ``length`` tokens, each text starting at a different essay) are fed to the model in
blocks of ``every`` tokens. With a budget ``N`` the cache carries a :class:`~chunkkv.DecodeBudget`
(``keep=N``, ``every``): a layer that reaches ``N + every`` tokens keeps ``N`` chosen by the method,
so each token attends over between ``N`` and ``N + every`` held tokens (the most recent ``window``
always among them). The full cache is the reference. Per text and (method, budget) one JSONL row
holds the mean NLL, the NLL per ``bucket`` positions (for the perplexity-vs-position plot), and the
ms per token and KV bytes held around position 1k and at the end.

Intervals: 95 % normal intervals over the per-bucket mean NLLs of all texts (buckets of 256 tokens
are treated as independent samples, which they are not quite), exponentiated for perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..pipeline import compress
from ..errors import ChunkKVError
from ..generation import extend, set_decode_budget
from ..methods import make_method
from ..outputs import ResumableStore
from ..prompt import check_positions
from .metrics import mean_interval

#: Report files written beside ``ppl.jsonl`` (removed with the records by ``overwrite``).
REPORTS = ("ppl.md", "ppl_summary.json", "ppl_vs_position.png")
#: Settings every row depends on; texts, budgets and methods only widen the plan of a rerun.
_ROW_SETTINGS = ("length", "every", "bucket", "essay_stride")


@dataclass
class PplConfig:
    """What a perplexity run measures (see the module docstring)."""

    texts: int = 2
    length: int = 8192
    budgets: list[int] = field(default_factory=lambda: [256, 512, 1024])
    methods: list[str] = field(default_factory=lambda: ["chunkkv", "snapkv", "streamingllm", "h2o"])
    every: int = 64
    bucket: int = 256
    essay_stride: int = 7  # text i starts at essay i * stride

    def validate(self) -> None:
        for name in ("texts", "length", "every", "bucket"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ChunkKVError(f"ppl {name}={value!r} must be a whole number >= 1")
        if self.length < 2:
            raise ChunkKVError(f"ppl length={self.length} must be >= 2 tokens: the first token predicts the second")
        if not self.budgets or min(self.budgets) < 1:
            raise ChunkKVError(f"ppl budgets {self.budgets} must be positive token counts")
        for name in self.methods:
            make_method(name, keep_tokens=max(self.budgets))  # unknown names fail here


def essay_token_texts(tokenizer, n: int, length: int, stride: int = 7) -> list[list[int]]:
    """``n`` texts of exactly ``length`` tokens: the essays joined, text ``i`` from essay ``i * stride``.
    A text never repeats an essay: a length the essays cannot fill is refused (a repeated text
    would be predicted by copying)."""
    from ..haystack import paul_graham_essays, paul_graham_text

    everything = sum(len(e) + 2 for e in paul_graham_essays())
    out = []
    for i in range(n):
        text = paul_graham_text(min_chars=min(length * 6, everything - 2), start=i * stride)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            raise ChunkKVError(f"--ppl-length {length}: the essays hold only {len(ids)} tokens for text {i} (each "
                               f"text is the essays joined once, from its own start); give --ppl-length {len(ids)} or less")
        out.append(ids[:length])
    return out


def ppl_settings(config: PplConfig, model_name: str, dtype: str) -> dict[str, Any]:
    """What every row of a perplexity folder depends on: a rerun with other settings is refused."""
    return {"task": "ppl", "model": model_name, "dtype": dtype, **{k: getattr(config, k) for k in _ROW_SETTINGS}}


def _row_id(row: dict[str, Any]) -> tuple:
    return (row["text"], row["method"], row["budget"])


def _legacy(row: dict[str, Any]) -> dict[str, Any] | None:
    saved = row.get("config")
    return {k: saved[k] for k in _ROW_SETTINGS if k in saved} if isinstance(saved, dict) else None


def ppl_store(out_dir: str | Path, config: PplConfig, model_name: str, dtype: str, *,
              overwrite: bool = False) -> ResumableStore:
    """The folder's ``ppl.jsonl`` under the rule of every resumable store
    (:class:`chunkkv.outputs.ResumableStore`); open it (``with``) before loading the model."""
    return ResumableStore(out_dir, "ppl.jsonl", ppl_settings(config, model_name, dtype), key="method", ident=_row_id,
                          overwrite=overwrite, outputs=REPORTS, legacy=_legacy)


def _model_label(model: torch.nn.Module) -> tuple[str, str]:
    name = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    return name, str(next(model.parameters()).dtype).replace("torch.", "")


@torch.inference_mode()
def teacher_forced(
    model: torch.nn.Module, ids: torch.Tensor, method=None, budget: int | None = None, every: int = 64
) -> dict[str, Any]:
    """NLL of every token after the first of ``ids [1, T]``, fed in blocks of ``every`` tokens.

    Returns ``{"nll": [T-1] float tensor, "blocks": [(start, ms_per_token, kv_bytes, max_stored)]}``.
    ``method`` + ``budget`` bound the cache (:class:`chunkkv.DecodeBudget`); None = full cache.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    total = ids.shape[1]
    ctx = compress(model, ids[:, :1])  # full cache of the first token; the bound applies from then on
    if method is not None:
        set_decode_budget(ctx, budget, every, method)
    nll = [torch.nn.functional.cross_entropy(ctx.next_logits.float(), ids[:, 1], reduction="none")]
    blocks = []
    for lo in range(1, total - 1, every):
        hi = min(total - 1, lo + every)
        start = time.perf_counter()
        logits = extend(model, ctx, ids[:, lo:hi])
        seconds = time.perf_counter() - start
        nll.append(torch.nn.functional.cross_entropy(logits[0].float(), ids[0, lo + 1 : hi + 1], reduction="none"))
        blocks.append((lo, 1000 * seconds / (hi - lo), ctx.cache.nbytes(), max(ctx.cache.stored_lengths())))
    return {"nll": torch.cat(nll).cpu(), "blocks": blocks}


def _near(blocks: list[tuple], lo: int, hi: int) -> dict[str, float | None]:
    chosen = [b for b in blocks if lo <= b[0] < hi]
    if not chosen:
        return {"ms_per_token": None, "kv_mib": None, "stored": None}
    return {
        "ms_per_token": round(sum(b[1] for b in chosen) / len(chosen), 3),
        "kv_mib": round(max(b[2] for b in chosen) / 2**20, 2),
        "stored": max(b[3] for b in chosen),
    }


def run_ppl(
    model: torch.nn.Module,
    tokenizer,
    config: PplConfig,
    out_dir: str | Path | None = None,
    *,
    store: ResumableStore | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run (or resume) every (text, method, budget) and the full cache; rows in ``out_dir/ppl.jsonl``.

    Order: per text the full cache first, then budgets from small to large, methods in the given order,
    so a run cut short still has whole (method, budget) cells for the first texts. The folder follows
    the rule of every resumable store (:class:`chunkkv.outputs.ResumableStore`: one run at a time,
    settings compared, torn lines cut, INCOMPLETE said when the run stops early); ``store``: one
    from :func:`ppl_store` already open (the CLI opens it before loading the model).

    Returns the rows of this run's plan (texts x cells), each once.
    """
    config.validate()
    check_positions(model.config, config.length, what=f"--ppl-length {config.length} asks for texts of {config.length} tokens",
                    fix="give a --ppl-length within the model's positions")
    if store is None:
        if out_dir is None:
            raise ChunkKVError("run_ppl needs out_dir (or an open store)")
        store = ppl_store(out_dir, config, *_model_label(model), overwrite=overwrite)
    with store:
        texts = essay_token_texts(tokenizer, config.texts, config.length, config.essay_stride)
        cells = [("full", None)] + [(m, b) for b in sorted(config.budgets) for m in config.methods]
        plan = [(t, name, budget) for t in range(len(texts)) for name, budget in cells]
        todo = set(store.plan(plan))
        for t, token_ids in enumerate(texts):
            ids = torch.tensor([token_ids])
            for name, budget in cells:
                if (t, name, budget) not in todo:
                    continue
                method = None if name == "full" else make_method(name, keep_tokens=budget)
                start = time.perf_counter()
                result = teacher_forced(model, ids, method, budget, config.every)
                nll = result["nll"]
                n_buckets = math.ceil(nll.shape[0] / config.bucket)
                buckets = [float(nll[i * config.bucket : (i + 1) * config.bucket].mean()) for i in range(n_buckets)]
                row = {
                    "text": t, "method": name, "budget": budget, "every": config.every, "tokens": int(nll.shape[0]),
                    "nll": float(nll.mean()), "ppl": math.exp(float(nll.mean())), "bucket": config.bucket,
                    "bucket_nll": [round(x, 5) for x in buckets],
                    "at_1k": _near(result["blocks"], 1024 - 256, 1024 + 256),
                    "at_end": _near(result["blocks"], config.length - 512, config.length),
                    "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
                    "config": asdict(config),
                }
                store.append(row)
                log(f"text {t} {name}{'' if budget is None else f' KV {budget}'}: ppl {row['ppl']:.3f} "
                    f"({row['seconds']} s; {row['at_end']['ms_per_token']} ms/token at the end)")
        wanted = set(plan)
        return [r for r in store.load() if _row_id(r) in wanted]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (method, budget): pooled perplexity over the texts measured, its 95 % interval, the mean
    NLL difference to the full cache on the same texts (with its interval), ms/token and KV at 1k and
    at the end."""
    full = {r["text"]: r for r in rows if r["method"] == "full"}
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["budget"]), []).append(r)
    out = {}
    for (method, budget), rs in sorted(cells.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        buckets = [x for r in rs for x in r["bucket_nll"]]
        mean, lo, hi = mean_interval(buckets)
        diffs = [x - y for r in rs if r["text"] in full for x, y in zip(r["bucket_nll"], full[r["text"]]["bucket_nll"])]
        d_mean, d_lo, d_hi = mean_interval(diffs) if diffs else (None, None, None)
        mean_of = lambda key, sub: (  # noqa: E731
            round(sum(r[key][sub] for r in rs) / len(rs), 3) if all(r[key][sub] is not None for r in rs) else None
        )
        out[f"{method}@{budget}"] = {
            "method": method, "budget": budget, "texts": sorted(r["text"] for r in rs),
            "tokens": sum(r["tokens"] for r in rs),
            "ppl": round(math.exp(mean), 3), "ppl_95": [round(math.exp(lo), 3), round(math.exp(hi), 3)],
            "delta_nll": None if d_mean is None else round(d_mean, 4),
            "delta_nll_95": None if d_mean is None else [round(d_lo, 4), round(d_hi, 4)],
            "ms_per_token_1k": mean_of("at_1k", "ms_per_token"), "ms_per_token_end": mean_of("at_end", "ms_per_token"),
            "kv_mib_1k": mean_of("at_1k", "kv_mib"), "kv_mib_end": mean_of("at_end", "kv_mib"),
            "stored_end": max((r["at_end"]["stored"] or 0) for r in rs),
        }
    return out


def to_markdown(summary: dict[str, Any], model_label: str) -> str:
    """The perplexity table (method x budget, full cache beside) and the cost table."""
    cells = list(summary.values())
    budgets = sorted({c["budget"] for c in cells if c["budget"] is not None})
    methods = list(dict.fromkeys(c["method"] for c in cells if c["method"] != "full"))
    full = summary.get("full@None")
    texts = full["texts"] if full else []
    lines = [
        f"Perplexity ({model_label}, Paul Graham essays, {len(texts)} texts x {full['tokens'] // max(1, len(texts)) if full else '?'} "
        "predicted tokens, teacher forcing in blocks; 95 % interval over 256-token buckets):", "",
        "| method | " + " | ".join(f"KV {b}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|",
    ]
    if full:
        lines.append(f"| full cache | {full['ppl']:.3f} [{full['ppl_95'][0]:.2f}, {full['ppl_95'][1]:.2f}] (all budgets) |"
                     + " |" * (len(budgets) - 1))
    for m in methods:
        row = []
        for b in budgets:
            c = summary.get(f"{m}@{b}")
            if c is None:
                row.append("not run")
            else:
                delta = "" if c["delta_nll"] is None else f"; ΔNLL {c['delta_nll']:+.3f} [{c['delta_nll_95'][0]:+.3f}, {c['delta_nll_95'][1]:+.3f}]"
                n = "" if c["texts"] == texts else f" (n={len(c['texts'])} texts)"
                row.append(f"{c['ppl']:.3f}{delta}{n}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Cost per token and KV held (KV = stored keys + values of all layers):", "",
              "| method @ KV | ms/token near 1k | ms/token at the end | KV MiB near 1k | KV MiB at the end |",
              "|---|---|---|---|---|"]
    for key, c in summary.items():
        lines.append(f"| {key.replace('@None', '')} | {c['ms_per_token_1k']} | {c['ms_per_token_end']} | "
                     f"{c['kv_mib_1k']} | {c['kv_mib_end']} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Perplexity vs position (per 256-token bucket, averaged over texts), one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(5 * max(1, len(budgets)), 4), sharey=True, squeeze=False)

    def curve(rs):
        n = min(len(r["bucket_nll"]) for r in rs)
        mean = [sum(r["bucket_nll"][i] for r in rs) / len(rs) for i in range(n)]
        return [(i + 0.5) * rs[0]["bucket"] for i in range(n)], [math.exp(x) for x in mean]

    full = [r for r in rows if r["method"] == "full"]
    for ax, budget in zip(axes[0], budgets):
        if full:
            x, y = curve(full)
            ax.plot(x, y, color="black", lw=2, label="full cache")
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
            rs = [r for r in rows if r["method"] == method and r["budget"] == budget]
            if rs:
                x, y = curve(rs)
                ax.plot(x, y, label=method)
        ax.axvline(budget, color="grey", ls=":", lw=1)
        ax.set_title(f"KV {budget}")
        ax.set_xlabel("position (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity (256-token buckets)")
    axes[0][0].set_yscale("log")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
