"""The efficiency benchmark: prefill overhead, decode speed against its bound, memory, peers.

Everything runs in one process on one model and one set of random prompts (speed does not depend
on the tokens), in this order, so every number in a report comes from the same run:

1. **prefill** (batch 1, every context): the full cache and each method at the same budget, plus
   ChunkKV at reuse depths 2..N, ``compress(..., measure=True)``: wall time of the prefill and of
   the compression step inside it (scoring + selection + gather, summed over layers). One
   untimed run per configuration first (it warms up and measures peak memory), then ``repeats``
   timed runs interleaved across configurations so drift hits all alike. After the last run of
   each configuration its cache is decoded (below), so every method also gets a decode speed.
2. **decode** (every context and batch size): the full cache and ``decode_method`` at each kept
   fraction. Each compressed cache is timed step by step *interleaved* with **the bound**: a
   full (uncompressed) cache of exactly the kept length, made by prefilling a prompt of that
   length. ``vs_bound = ms(compressed) / ms(bound)`` says how close decoding is to what the
   cache's size allows.
3. **e2e**: "N in / M out" requests (prefill + M-1 decode steps, greedy, no early stop).
4. **scaling**: the compression step of one layer on random queries/keys of the model's shape
   at growing lengths, time and peak extra memory, with log-log slopes (1 = linear).
5. **peers**: kvpress 0.5.5 in its own environment (:mod:`chunkkv.bench.peers`).
6. **memory**, last: every prefill configuration, decode cache and scaling point once more, untimed,
   for peak memory (:class:`~chunkkv.bench.measure.MemoryMeter`).

Timing and memory are measured apart. On CPU the meter fixes glibc's mmap threshold (so that peak
RSS repeats), which slows the very code being timed (a 2k decode step 38 -> 60 ms on one thread):
every timed run therefore comes first, with the allocator as users run it, and the meter is made
only for the memory phase. Nothing is timed after it; ``meta.timing_allocator`` and
``meta.memory_method`` say which setting each kind of figure was taken under (a process whose
threshold an earlier meter fixed says so). KV bytes are read from the cache tensors.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .. import selection as sel
from ..cache import ChunkKVCache, PrunedLayer
from ..pipeline import compress
from ..context import CompressedContext
from ..generation import extend
from ..methods import ChunkKV, FullKV, LayerInputs, Method, make_method
from ..prompt import check_positions
from ..scoring import Workspace
from .measure import MemoryMeter, allocator_state, expected_kv_bytes, kv_bytes_per_layer, now, stats_dict
from .models import DEFAULT_METHODS
from .peers import compared, run_peers


@dataclass
class BenchConfig:
    """What to measure. Defaults are the CPU settings; see ``docs/benchmarks.md`` for GPU ones.

    Attributes:
        contexts: prompt lengths (tokens) for prefill, decode and peers.
        batch_sizes: batch sizes for the decode sweep (the method comparison is batch 1).
        budget: share of the prompt kept by every method in the prefill comparison and e2e.
        decode_fractions: kept shares for the decode sweep.
        methods: methods compared at ``budget`` (``full`` is always included).
        reuse_depths: ChunkKV layer-wise reuse depths (1 = off) for the reuse comparison.
        decode_method: the method of the decode sweep.
        repeats: timed prefill / e2e runs per configuration (after one untimed run).
        e2e_repeats: timed e2e runs (default: ``repeats``).
        decode_steps / decode_warmup: timed and untimed decode steps per cache.
        e2e: ``(n_in, n_out)`` requests, e.g. ``[(4096, 64)]``.
        scaling_contexts: lengths for the scaling check (default: the contexts, extended by
            doubling to at least three points).
        peers: run kvpress side by side (needs ``kvpress_python``).
        peer_rounds: kvpress runs this many times, each after our compared configurations are timed
            again (the first round uses the prefill section's times), so the two sides alternate and
            each ratio is the median of the rounds' ratios: one process of either side can be a few
            per cent off on a shared machine.
        threads: ``torch.set_num_threads`` (None = leave as is).
        memory: run the memory phase (False: timings only, e.g. for a peer comparison).
    """

    contexts: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2])
    budget: float = 0.1
    decode_fractions: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.1])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    reuse_depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    decode_method: str = "chunkkv"
    repeats: int = 3
    decode_steps: int = 16
    decode_warmup: int = 2
    e2e: list[tuple[int, int]] = field(default_factory=lambda: [(4096, 64)])
    e2e_batch: int = 1
    e2e_repeats: int | None = None
    scaling_contexts: list[int] | None = None
    scaling_repeats: int = 5
    peers: bool = True
    peer_contexts: list[int] | None = None
    peer_rounds: int = 1
    kvpress_python: str | None = None
    threads: int | None = None
    seed: int = 0
    memory: bool = True

    def validate(self) -> None:
        if not self.contexts or any(c < 2 for c in self.contexts):
            raise ValueError(f"contexts must be lengths >= 2, got {self.contexts}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget={self.budget} must be a kept share in (0, 1]")
        if any(not 0 < f <= 1 for f in self.decode_fractions):
            raise ValueError(f"decode fractions must be kept shares in (0, 1], got {self.decode_fractions}")
        if self.repeats < 1 or self.decode_steps < 1 or self.decode_warmup < 0:
            raise ValueError("repeats and decode_steps must be >= 1, decode_warmup >= 0")
        if any(b < 1 for b in self.batch_sizes) or not self.batch_sizes:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if any(d < 1 for d in self.reuse_depths):
            raise ValueError(f"reuse depths must be >= 1, got {self.reuse_depths}")
        if isinstance(self.peer_rounds, bool) or not isinstance(self.peer_rounds, int) or self.peer_rounds < 1:
            raise ValueError(f"peer rounds must be an int >= 1 (kvpress runs, alternated with ours), got {self.peer_rounds!r}")


# --- configurations -----------------------------------------------------------------------------
@dataclass
class Entry:
    """One configuration: a name for tables and the method it runs."""

    name: str
    method: Method
    reuse_depth: int = 1

    @property
    def compressed(self) -> bool:
        return not isinstance(self.method, FullKV)


def prefill_entries(cfg: BenchConfig, with_presets: bool) -> list[Entry]:
    """The prefill comparison: full, each method at the budget, ChunkKV reuse depths, presets."""
    entries = [Entry("full", FullKV())]
    for name in cfg.methods:
        if name in ("full", "none"):
            continue
        entries.append(Entry(name, make_method(name, keep_fraction=cfg.budget)))
    if "chunkkv" in [e.name for e in entries] or cfg.reuse_depths:
        if "chunkkv" not in [e.name for e in entries] and 1 in cfg.reuse_depths:
            entries.append(Entry("chunkkv", ChunkKV(keep_fraction=cfg.budget)))
        for depth in cfg.reuse_depths:
            if depth > 1:
                entries.append(Entry(f"chunkkv_reuse{depth}", ChunkKV(keep_fraction=cfg.budget, reuse_depth=depth), depth))
    if with_presets:
        remove = round(1.0 - cfg.budget, 10)
        entries.append(Entry("chunkkv-kvpress", make_method("chunkkv-kvpress", remove_fraction=remove)))
        entries.append(Entry("snapkv-kvpress", make_method("snapkv-kvpress", remove_fraction=remove)))
    return entries


def _e2e_plan(cfg: BenchConfig) -> list[Entry]:
    """The configurations every end-to-end request runs."""
    return [
        Entry("full", FullKV()),
        Entry("snapkv", make_method("snapkv", keep_fraction=cfg.budget)),
        Entry("chunkkv", ChunkKV(keep_fraction=cfg.budget)),
        Entry("chunkkv_reuse2", ChunkKV(keep_fraction=cfg.budget, reuse_depth=2), 2),
    ]


def _decode_method(cfg: BenchConfig, fraction: float) -> Method:
    return make_method(cfg.decode_method, keep_fraction=fraction)


# --- helpers ------------------------------------------------------------------------------------
class Prompts:
    """Deterministic random prompts: row ``b`` of context ``n`` is the same for every batch size."""

    def __init__(self, vocab: int, seed: int, device: torch.device) -> None:
        self.low = min(100, max(0, vocab // 4))  # skip the special ids of real tokenizers
        self.vocab = vocab
        self.seed = seed
        self.device = device
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, length: int, batch: int = 1) -> torch.Tensor:
        have = self._cache.get((length, 0))
        if have is None or have.shape[0] < batch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + length)
            rows = max(batch, 1 if have is None else have.shape[0])
            have = torch.randint(self.low, self.vocab, (rows, length), generator=g, device="cpu").to(self.device)
            self._cache[(length, 0)] = have
        return have[:batch]


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    cfg = model.config.get_text_config(decoder=True)
    param = next(model.parameters())
    n_heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return {
        "architecture": type(model).__name__,
        "params_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "num_layers": cfg.num_hidden_layers,
        "num_attention_heads": n_heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "dtype": str(param.dtype).replace("torch.", ""),
        "element_size": param.element_size(),
        "device": str(param.device),
        "attn_implementation": str(getattr(model.config, "_attn_implementation", "?")),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cache_summary(cache: ChunkKVCache, info: dict[str, Any], batch: int) -> dict[str, Any]:
    """KV bytes per layer and in total, read from the tensors, with the arithmetic check."""
    per_layer = kv_bytes_per_layer(cache)
    stored = cache.stored_lengths()
    expected = [
        expected_kv_bytes(batch, info["num_kv_heads"], n, info["head_dim"], info["element_size"]) for n in stored
    ]
    return {
        "stored_per_layer": stored,
        "kv_bytes_per_layer": per_layer,
        "kv_bytes": sum(per_layer),
        "kv_bytes_arithmetic": sum(expected),
        "kv_bytes_match_arithmetic": per_layer == expected,
    }


def _fit_loglog(xs: list[float], ys: list[float]) -> dict[str, float | None]:
    """Least-squares slope of log(y) on log(x) (1 = linear, 2 = quadratic) and R² of y = a + b x."""
    pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return {"loglog_slope": None, "linear_r2": None}
    lx = [math.log(x) for x, _ in pts]
    ly = [math.log(y) for _, y in pts]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx if sxx else None
    xs_, ys_ = [p[0] for p in pts], [p[1] for p in pts]
    mx2, my2 = sum(xs_) / len(xs_), sum(ys_) / len(ys_)
    sxx2 = sum((a - mx2) ** 2 for a in xs_)
    syy2 = sum((b - my2) ** 2 for b in ys_)
    if sxx2 and syy2:
        b = sum((a - mx2) * (c - my2) for a, c in zip(xs_, ys_)) / sxx2
        a0 = my2 - b * mx2
        ss_res = sum((c - (a0 + b * a)) ** 2 for a, c in zip(xs_, ys_))
        r2 = 1 - ss_res / syy2
    else:
        r2 = None
    return {
        "loglog_slope": None if slope is None else round(slope, 3),
        "linear_r2": None if r2 is None else round(r2, 4),
    }


# --- the benchmark ------------------------------------------------------------------------------
class _Progress:
    """The bench's bar (:func:`chunkkv.cli_common.progress`: a terminal only, nothing left behind)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from ..cli_common import progress

        self._context = progress(enabled)
        self.bar = self._context.__enter__()
        self.total, self.steps = total, 0
        self.task = self.bar.add_task("bench", total=total)

    def step(self, label: str) -> None:
        self.steps += 1
        self.bar.update(self.task, advance=1, description=f"bench: {label[:60]}")

    def close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


class Bench:
    """Runs :class:`BenchConfig` on one model. Use :func:`run_bench`."""

    def __init__(self, model: torch.nn.Module, cfg: BenchConfig, *, progress: bool = True,
                 model_label: str = "model", model_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None,
                 on_section: Callable[[dict[str, Any]], None] | None = None) -> None:
        cfg.validate()
        self.model = model
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.info = model_info(model)
        # Made by the memory phase, after every timed run (on CPU it fixes glibc's mmap threshold).
        self.meter: MemoryMeter | None = None
        self.prompts = Prompts(self.info["vocab_size"], cfg.seed, self.device)
        self.model_label = model_label
        self.model_dir = model_dir
        self.log = log or (lambda msg: None)
        self.progress_enabled = progress
        self.on_section = on_section or (lambda result: None)
        self._bounds: dict[tuple[int, int], CompressedContext] = {}
        self.result: dict[str, Any] = {}

    # --- primitives -------------------------------------------------------------------------
    def _compress(self, ids: torch.Tensor, method: Method, measure: bool = False) -> CompressedContext:
        return compress(self.model, ids, method=method, measure=measure)

    def _advance(self, ctx: CompressedContext) -> None:
        """One greedy decode step over ``ctx`` (in place), untimed."""
        token = ctx.next_logits.argmax(dim=-1)
        extend(self.model, ctx, token[:, None])

    def _step(self, ctx: CompressedContext) -> float:
        """One greedy decode step over ``ctx`` (in place); seconds."""
        t0 = now(self.device)
        self._advance(ctx)
        return now(self.device) - t0

    def _bound(self, kept: int, batch: int) -> CompressedContext:
        """A full cache of exactly ``kept`` tokens (prefill of a ``kept``-token prompt), kept for reuse."""
        key = (kept, batch)
        if key not in self._bounds:
            ctx = self._compress(self.prompts.get(max(kept, 1), batch)[:, :kept], FullKV())
            stored = set(ctx.cache.stored_lengths())
            if stored != {kept}:
                raise RuntimeError(f"bound cache stores {sorted(stored)} tokens, expected exactly {kept}")
            self._bounds[key] = ctx
        return self._bounds[key]

    def _decode(self, ctx: CompressedContext, batch: int, with_bound: bool) -> dict[str, Any]:
        """Time decode steps over ``ctx`` (consumed) after untimed warm-up steps, interleaved with its
        bound. Memory is measured apart (:meth:`_decode_memory`, in the memory phase)."""
        steps, warmup = self.cfg.decode_steps, self.cfg.decode_warmup
        stored = ctx.cache.stored_lengths()
        kept = max(stored)
        row: dict[str, Any] = {}
        for _ in range(max(1, warmup)):
            self._step(ctx)
        bound_ctx = None
        bound_stored = None
        if with_bound:
            base = self._bound(kept, batch)
            bound_stored = base.cache.stored_lengths()
            bound_ctx = base.fork()
            for _ in range(max(1, warmup)):
                self._step(bound_ctx)
        ours, theirs = [], []
        for _ in range(steps):
            ours.append(self._step(ctx))
            if bound_ctx is not None:
                theirs.append(self._step(bound_ctx))
        row["ms_per_token"] = stats_dict(ours, 1e3, 4)
        row["tokens_per_s"] = round(batch * 1e3 / row["ms_per_token"]["median"], 2)
        if bound_ctx is not None:
            row["bound"] = {
                "stored_per_layer": bound_stored,
                "ms_per_token": stats_dict(theirs, 1e3, 4),
            }
            # Ratio of medians, and the median of step-paired ratios (robust to drift).
            paired = sorted(a / b for a, b in zip(ours, theirs))
            row["vs_bound"] = round(row["ms_per_token"]["median"] / row["bound"]["ms_per_token"]["median"], 4)
            row["vs_bound_paired"] = round(paired[len(paired) // 2], 4)
        return row

    def _decode_memory(self, ctx: CompressedContext) -> dict[str, int]:
        """Memory of decoding ``ctx`` (consumed; memory phase only): the peak over the untimed warm-up
        steps. ``decode_peak_extra_bytes`` is what a decode step needs on top of what was live before
        it (the cache itself included there), ``decode_bytes`` = KV bytes + that extra."""
        kv = sum(kv_bytes_per_layer(ctx.cache))
        base = self.meter.current()
        self.meter.reset_peak()
        for _ in range(max(1, self.cfg.decode_warmup)):
            self._advance(ctx)
        extra = self.meter.peak() - base
        return {"decode_peak_extra_bytes": extra, "decode_bytes": kv + extra}

    # --- sections ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        threads_before = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads_before)

    def _steps(self, entries: list[Entry]) -> int:
        """How many times the sections below call ``progress.step``: the bar's total."""
        cfg = self.cfg

        def runnable(plan: list[Entry], n: int) -> int:
            return sum(1 for e in plan if not (e.compressed and n <= e.method.window))

        prefill = sum(runnable(entries, c) * (1 + cfg.repeats) for c in cfg.contexts)
        decode = len(cfg.contexts) * len(cfg.batch_sizes) * (1 + len(cfg.decode_fractions))
        e2e = sum(runnable(_e2e_plan(cfg), n_in) * (1 + (cfg.e2e_repeats or cfg.repeats)) for n_in, _ in cfg.e2e)
        memory = len(cfg.contexts) + 1 if cfg.memory else 0  # one step per context, one for the scaling points
        peers = 1 if cfg.peers else 0
        if cfg.peers and cfg.peer_rounds > 1:  # each later round times our compared configurations again
            contexts, names = compared(cfg)
            timed = sum(runnable([e for e in entries if e.name in names], c) for c in contexts if c in cfg.contexts)
            peers += (cfg.peer_rounds - 1) * cfg.repeats * timed
        # warm-up, prefill, decode, e2e, scaling, peers, memory
        return 1 + prefill + decode + e2e + 1 + peers + memory

    def _check_positions(self) -> None:
        """Refuse, before anything runs, a context that decoding would take past the model's positions
        (SmolLM2: 8192): otherwise the bench stops minutes in, at the first decode step of that context."""
        cfg = self.cfg
        decoded = max(1, cfg.decode_warmup) + cfg.decode_steps
        widths = [(c + decoded, f"--contexts {c} plus {decoded} decode steps ({max(1, cfg.decode_warmup)} untimed)")
                  for c in cfg.contexts]
        widths += [(n_in + n_out, f"--e2e {n_in}:{n_out}") for n_in, n_out in cfg.e2e]
        width, what = max(widths)
        check_positions(getattr(self.model, "config", None), width, what=f"{what} need {width} positions",
                        fix="use shorter --contexts / --e2e or fewer --decode-steps")

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        peers_on = cfg.peers
        entries = prefill_entries(cfg, with_presets=peers_on)
        self._check_positions()
        total = self._steps(entries)
        self.progress = _Progress(total, self.progress_enabled)
        started = time.time()
        # Objects that exist now (modules, the model) are never garbage: keep the full collections
        # that precede each memory reading from scanning them (0.2 s each otherwise).
        gc.collect()
        gc.freeze()
        timing_allocator = allocator_state()  # before anything runs: what every timed figure is taken under
        self.result = {
            "meta": self._meta(entries, timing_allocator),
            "prefill": [],
            "reuse": [],
            "decode": [],
            "e2e": [],
            "scaling": {},
            "peers": {"status": "skipped (--no-peers)"},
        }
        try:
            self._warmup(entries)
            for context in cfg.contexts:
                self._prefill_section(context, entries)
                self.on_section(self.result)
            self._decode_section()
            self._bounds.clear()
            self.on_section(self.result)
            for n_in, n_out in cfg.e2e:
                self._e2e_section(n_in, n_out)
                self.on_section(self.result)
            self._scaling_section()
            self.progress.step("scaling")
            self.on_section(self.result)
            if peers_on:
                self.result["peers"] = run_peers(self, self.log)
                self.progress.step("peers")
                self.on_section(self.result)
            if cfg.memory:
                self._memory_section(entries)  # last: nothing is timed after the meter fixes the allocator
                self.on_section(self.result)
            else:
                self.result["meta"]["memory_method"] = "not measured (memory phase off)"
        finally:
            self.progress.close()
            self._bounds.clear()
            gc.unfreeze()
        from .report import evaluate_targets

        self.result["targets"] = evaluate_targets(self.result)
        self.result["meta"]["wall_seconds"] = round(time.time() - started, 1)
        return self.result

    def _meta(self, entries: list[Entry], timing_allocator: str) -> dict[str, Any]:
        import transformers

        return {
            "chunkkv_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "python": platform.python_version(),
            "model": self.model_label,
            "model_info": self.info,
            "device": str(self.device),
            "device_name": device_name(self.device),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "timing_allocator": timing_allocator,
            "memory_method": "not measured yet (the memory phase runs after every timed run)",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.cfg).items()},
            "configurations": {e.name: e.method.describe() for e in entries},
        }

    def _warmup(self, entries: list[Entry]) -> None:
        """One short run of every method and a few decode steps (kernels, allocator, lazy init)."""
        length = max(min(min(self.cfg.contexts), 256), 2)
        ids = self.prompts.get(length, 1)
        for e in entries:
            if e.compressed and length <= e.method.window:
                continue
            ctx = self._compress(ids, e.method, measure=True)
            for _ in range(2):
                self._step(ctx)
            del ctx
        self.progress.step("warm-up")

    def _prefill_section(self, context: int, entries: list[Entry]) -> None:
        cfg = self.cfg
        ids = self.prompts.get(context, 1)
        runnable = [e for e in entries if not (e.compressed and context <= e.method.window)]
        rows: dict[str, dict[str, Any]] = {}
        # 1. untimed run per configuration: warm-up + cache sizes (memory: the memory phase)
        for e in runnable:
            ctx = self._compress(ids, e.method, measure=True)
            row = {
                "context": context,
                "batch": 1,
                "config": e.name,
                "method": e.method.describe(),
                "reuse_depth": e.method.reuse_depth,
                "kept_per_layer": [ctx.cache.stored_lengths()[i] for i in ctx.cache.pruned_layers],
                "scored_layers": len(ctx.stats.scored_layers),
                **cache_summary(ctx.cache, self.info, 1),
            }
            rows[e.name] = row
            del ctx
            self.progress.step(f"prefill {context} {e.name} (untimed)")
        self._timed_runs(ids, runnable, rows, f"prefill {context}")
        full = rows["full"]
        full_prefill = full["prefill_s"]["median"]
        reuse1 = rows.get("chunkkv")
        for e in runnable:
            row = rows[e.name]
            row["prefill_vs_full"] = round(row["prefill_s"]["median"] / full_prefill, 4)
            if e.compressed:
                row["compress_share_of_prefill"] = round(
                    row["compress_ms"]["median"] / 1e3 / row["prefill_s"]["median"], 5
                )
                row["kv_bytes_vs_full"] = round(row["kv_bytes"] / full["kv_bytes"], 4)
            self.result["prefill"].append(row)
        # reuse comparison
        if reuse1 is not None:
            base_ms = reuse1["compress_ms"]["median"]
            for e in runnable:
                if e.name == "chunkkv" or e.name.startswith("chunkkv_reuse"):
                    row = rows[e.name]
                    self.result["reuse"].append({
                        "context": context,
                        "reuse_depth": e.method.reuse_depth,
                        "config": e.name,
                        "scored_layers": row["scored_layers"],
                        "compress_ms": row["compress_ms"],
                        "compress_vs_depth1": round(row["compress_ms"]["median"] / base_ms, 4),
                        "compress_share_of_prefill": row["compress_share_of_prefill"],
                        "prefill_s": row["prefill_s"],
                    })

    def _timed_runs(self, ids: torch.Tensor, runnable: list[Entry], rows: dict[str, dict[str, Any]],
                    label: str) -> None:
        """Timed prefills of every configuration, interleaved, ``repeats`` times; the last one's cache
        is decoded (timed with its bound). Sets each row's ``prefill_s``, ``compress_ms`` and ``decode``."""
        cfg = self.cfg
        # on CUDA prefill time comes from runs without measure (no syncs)
        separate = self.device.type == "cuda"
        samples = {e.name: ([], []) for e in runnable}
        for r in range(cfg.repeats):
            for e in runnable:
                prefill, compress = samples[e.name]
                if separate:
                    ctx = self._compress(ids, e.method, measure=False)
                    prefill.append(ctx.stats.prefill_seconds)
                    del ctx
                ctx = self._compress(ids, e.method, measure=True)
                if not separate:
                    prefill.append(ctx.stats.prefill_seconds)
                compress.append(ctx.stats.select_seconds)
                if r == cfg.repeats - 1:
                    rows[e.name]["decode"] = self._decode(ctx, 1, with_bound=e.compressed)
                del ctx
                self.progress.step(f"{label} {e.name} #{r + 1}")
        self._bounds.clear()
        for e in runnable:
            prefill, compress = samples[e.name]
            rows[e.name]["prefill_s"] = stats_dict(prefill, 1.0, 5)
            rows[e.name]["compress_ms"] = stats_dict(compress, 1e3, 4) if e.compressed else None

    def peer_round(self, context: int, names: set[str]) -> dict[str, dict[str, Any]]:
        """Our side of one more kvpress round: the configurations ``names`` timed again at ``context``
        as the prefill section times them (rows keyed by configuration, as in ``result["prefill"]``)."""
        done = {r["config"]: r for r in self.result["prefill"] if r["context"] == context}
        entries = [e for e in prefill_entries(self.cfg, with_presets=True) if e.name in names and e.name in done]
        rows = {e.name: {"context": context, "config": e.name, "kept_per_layer": done[e.name]["kept_per_layer"]}
                for e in entries}
        self._timed_runs(self.prompts.get(context, 1), entries, rows, f"peer round {context}")
        return rows

    def _decode_section(self) -> None:
        cfg = self.cfg
        done = {(r["context"], r["config"]) for r in self.result["prefill"]}
        for context in cfg.contexts:
            for batch in cfg.batch_sizes:
                ids = self.prompts.get(context, batch)
                plan: list[tuple[str, Method, float]] = [("full", FullKV(), 1.0)]
                for f in cfg.decode_fractions:
                    plan.append((f"{cfg.decode_method}@{f:g}", _decode_method(cfg, f), f))
                for name, method, fraction in plan:
                    label = f"decode {context} b{batch} {name}"
                    reuse = None
                    if batch == 1:
                        src = "full" if fraction == 1.0 else (cfg.decode_method if math.isclose(fraction, cfg.budget) else None)
                        if src is not None and (context, src) in done:
                            reuse = next(r for r in self.result["prefill"] if r["context"] == context and r["config"] == src)
                    if not isinstance(method, FullKV) and context <= method.window:
                        self.progress.step(label)
                        continue
                    if reuse is not None:
                        row = {
                            "context": context, "batch": batch, "config": name, "keep_fraction": fraction,
                            "method": method.describe(), "source": f"prefill section ({reuse['config']})",
                            "source_config": reuse["config"],
                            "stored_per_layer": reuse["stored_per_layer"], "kv_bytes": reuse["kv_bytes"],
                            "kv_bytes_arithmetic": reuse["kv_bytes_arithmetic"],
                            **reuse["decode"],
                        }
                    else:
                        ctx = self._compress(ids, method)
                        summary = cache_summary(ctx.cache, self.info, batch)
                        row = {
                            "context": context, "batch": batch, "config": name, "keep_fraction": fraction,
                            "method": method.describe(), "source": "decode section",
                            "stored_per_layer": summary["stored_per_layer"], "kv_bytes": summary["kv_bytes"],
                            "kv_bytes_arithmetic": summary["kv_bytes_arithmetic"],
                            **self._decode(ctx, batch, with_bound=not isinstance(method, FullKV)),
                        }
                        del ctx
                    self.result["decode"].append(row)
                    self.progress.step(label)
                self._bounds.clear()
        # speed-up over the full cache, per (context, batch)
        full = {(r["context"], r["batch"]): r for r in self.result["decode"] if r["config"] == "full"}
        for r in self.result["decode"]:
            f = full.get((r["context"], r["batch"]))
            if f is not None:
                r["speedup_vs_full"] = round(f["ms_per_token"]["median"] / r["ms_per_token"]["median"], 4)

    def _e2e_section(self, n_in: int, n_out: int) -> None:
        cfg = self.cfg
        batch = cfg.e2e_batch
        ids = self.prompts.get(n_in, batch)
        plan = [e for e in _e2e_plan(cfg) if not (e.compressed and n_in <= e.method.window)]
        samples: dict[str, dict[str, list[float]]] = {e.name: {"total": [], "prefill": [], "decode": []} for e in plan}

        def request(e: Entry) -> tuple[float, float, float]:
            t0 = now(self.device)
            ctx = self._compress(ids, e.method)
            token = ctx.next_logits.argmax(dim=-1)  # first output token comes from the prefill
            t1 = now(self.device)
            for _ in range(n_out - 1):
                extend(self.model, ctx, token[:, None])
                token = ctx.next_logits.argmax(dim=-1)
            t2 = now(self.device)
            return t2 - t0, t1 - t0, t2 - t1

        for e in plan:  # untimed
            request(e)
            self.progress.step(f"e2e {n_in}:{n_out} {e.name} (untimed)")
        for r in range(cfg.e2e_repeats or cfg.repeats):
            for e in plan:
                total, pre, dec = request(e)
                samples[e.name]["total"].append(total)
                samples[e.name]["prefill"].append(pre)
                samples[e.name]["decode"].append(dec)
                self.progress.step(f"e2e {n_in}:{n_out} {e.name} #{r + 1}")
        full_total = None
        for e in plan:
            s = samples[e.name]
            total = stats_dict(s["total"], 1.0, 4)
            dec = stats_dict(s["decode"], 1.0, 4)
            row = {
                "n_in": n_in, "n_out": n_out, "batch": batch, "config": e.name, "method": e.method.describe(),
                "latency_s": total,
                "prefill_s": stats_dict(s["prefill"], 1.0, 4),
                "decode_s": dec,
                "output_tokens_per_s": round(batch * n_out / total["median"], 2),
                "decode_tokens_per_s": round(batch * max(n_out - 1, 0) / dec["median"], 2) if dec["median"] > 0 else None,
            }
            if e.name == "full":
                full_total = total["median"]
            if full_total:
                row["latency_vs_full"] = round(total["median"] / full_total, 4)
            self.result["e2e"].append(row)

    @torch.inference_mode()
    def _layer_step(self, method: Method, filled: PrunedLayer, q: torch.Tensor, workspace: Workspace | None) -> None:
        """One layer's compression step as ``compress`` runs it: score, select, finalize, gather.

        ``filled``: a layer holding the prompt's keys and values (left as it is: a shallow copy is
        pruned). ``workspace``: the scratch buffers a prefill's layers share; reused across calls
        it stands for a layer after the first, fresh for the first one (whose peak includes it)."""
        layer = copy.copy(filled)
        k = layer.keys
        n = k.shape[2]
        kept = method.budget.kept(n)
        inputs = LayerInputs(
            queries=q, keys=k, scaling=k.shape[-1] ** -0.5, softcap=None, key_valid=None,
            lengths=torch.tensor([n], device=self.device), pad=torch.zeros(1, dtype=torch.long, device=self.device),
            kept=torch.tensor([kept], device=self.device), slots=kept, workspace=workspace,
        )
        index, _valid = sel.finalize(method.select(inputs), inputs.pad)
        layer.prune(index, None)

    def _scaling_methods(self) -> dict[str, Method]:
        budget = self.cfg.budget
        return {"chunkkv": ChunkKV(keep_fraction=budget), "snapkv": make_method("snapkv", keep_fraction=budget)}

    def _scaling_contexts(self) -> list[int]:
        contexts = sorted(set(self.cfg.scaling_contexts or self.cfg.contexts))
        while len(contexts) < 3:
            contexts.append(contexts[-1] * 2)
        return contexts

    def _scaling_inputs(self, n: int, g: torch.Generator) -> tuple[PrunedLayer, torch.Tensor]:
        """Random queries and a layer holding random keys / values of the model's shape, ``n`` tokens."""
        info = self.info
        dtype = next(self.model.parameters()).dtype
        shape_q = (1, info["num_attention_heads"], n, info["head_dim"])
        shape_k = (1, info["num_kv_heads"], n, info["head_dim"])
        q, k, v = (torch.randn(shape, generator=g, device="cpu").to(self.device, dtype)
                   for shape in (shape_q, shape_k, shape_k))
        layer = PrunedLayer()
        layer.update(k, v)
        return layer, q

    def _scaling_section(self) -> None:
        """The compression step of one layer, isolated, at growing lengths: time and peak extra memory."""
        cfg = self.cfg
        contexts = self._scaling_contexts()
        info = self.info
        methods = self._scaling_methods()
        g = torch.Generator(device="cpu").manual_seed(cfg.seed + 7)
        out: dict[str, Any] = {"what": "one layer's scoring + selection + gather on random q/k/v of the model's shape "
                                       "(timed with the scratch buffers reused, as by a prefill's later layers; "
                                       "the peak includes them, as for its first)",
                               "methods": {}}
        for name, method in methods.items():
            points = []
            for n in contexts:
                if n <= method.window:
                    continue
                layer, q = self._scaling_inputs(n, g)
                workspace = Workspace()
                self._layer_step(method, layer, q, workspace)  # warm-up (memory: the memory phase)
                times = []
                for _ in range(cfg.scaling_repeats):
                    t0 = now(self.device)
                    self._layer_step(method, layer, q, workspace)
                    times.append(now(self.device) - t0)
                points.append({
                    "context": n,
                    "compress_ms": stats_dict(times, 1e3, 4),
                    "quadratic_buffer_bytes": info["num_attention_heads"] * n * n * 4,  # fp32 T x T per query head
                })
                del layer, q, workspace
            fit_t = _fit_loglog([p["context"] for p in points], [p["compress_ms"]["median"] for p in points])
            out["methods"][name] = {"points": points, "time_fit": fit_t}
        # the same check on the real prefill runs: compression time (all layers) vs context
        real = [r for r in self.result["prefill"] if r["config"] == "chunkkv"]
        if real:
            xs = [r["context"] for r in real]
            out["prefill_chunkkv"] = {
                "contexts": xs,
                "compress_ms": [r["compress_ms"]["median"] for r in real],
                "time_fit": _fit_loglog(xs, [r["compress_ms"]["median"] for r in real]),
            }
        self.result["scaling"] = out

    def _memory_section(self, entries: list[Entry]) -> None:
        """Peak memory of everything the timed sections ran, once each, untimed (see the module
        docstring): prefill peaks, decode peaks, and the scaling points. The meter is made here."""
        cfg = self.cfg
        self.meter = MemoryMeter(self.device)  # on CPU: glibc's mmap threshold is fixed from here on
        self.result["meta"]["memory_method"] = self.meter.method
        prefill = self.result["prefill"]
        for context in cfg.contexts:
            ids = self.prompts.get(context, 1)
            rows = {r["config"]: r for r in prefill if r["context"] == context}
            for e in entries:
                row = rows.get(e.name)
                if row is None:
                    continue
                base = self.meter.current()
                self.meter.reset_peak()
                ctx = self._compress(ids, e.method)
                row["prefill_peak_bytes_above_weights"] = self.meter.peak() - base
                if "decode" in row:
                    row["decode"].update(self._decode_memory(ctx))
                del ctx
            full = rows.get("full")
            for row in rows.values():
                if row["config"] != "full" and full is not None:
                    row["prefill_peak_vs_full"] = round(
                        row["prefill_peak_bytes_above_weights"] / max(1, full["prefill_peak_bytes_above_weights"]), 4)
            self.progress.step(f"memory {context}")
        by_config = {(r["context"], r["config"]): r for r in prefill}
        for r in self.result["decode"]:
            if r["source"] == "decode section":
                method = FullKV() if r["config"] == "full" else _decode_method(cfg, r["keep_fraction"])
                ctx = self._compress(self.prompts.get(r["context"], r["batch"]), method)
                r.update(self._decode_memory(ctx))
                del ctx
            else:  # the cache of the prefill section, measured above
                src = by_config[(r["context"], r["source_config"])]["decode"]
                r.update({k: src[k] for k in ("decode_peak_extra_bytes", "decode_bytes")})
        scaling = self.result.get("scaling", {}).get("methods", {})
        g = torch.Generator(device="cpu").manual_seed(cfg.seed + 7)
        for name, method in self._scaling_methods().items():
            points = {p["context"]: p for p in scaling.get(name, {}).get("points", [])}
            for n in self._scaling_contexts():
                if n not in points:
                    continue
                layer, q = self._scaling_inputs(n, g)
                self._layer_step(method, layer, q, Workspace())  # warm-up
                base = self.meter.current()
                self.meter.reset_peak()
                self._layer_step(method, layer, q, Workspace())  # a fresh workspace: a prefill's first layer
                extra = self.meter.peak() - base
                p = points[n]
                p.update(peak_extra_bytes=extra, peak_extra_bytes_per_token=round(extra / n, 1),
                         peak_extra_vs_quadratic=round(extra / p["quadratic_buffer_bytes"], 5))
                del layer, q
            if name in scaling:
                pts = scaling[name]["points"]
                scaling[name]["memory_fit"] = _fit_loglog([p["context"] for p in pts],
                                                          [p["peak_extra_bytes"] for p in pts])
        self.progress.step("memory: scaling")


def run_bench(model: torch.nn.Module, config: BenchConfig | None = None, *, progress: bool = True,
              model_label: str = "model", model_dir: str | Path | None = None,
              log: Callable[[str], None] | None = None,
              on_section: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the efficiency benchmark on ``model`` and return the results (JSON-ready dict).

    ``model_dir`` (a saved folder with safetensors) lets the kvpress peers load the same weights
    without saving them again. ``on_section(result)`` is called with the results so far after
    each section (the CLI writes them to ``results.partial.json``). Write the outputs with
    :func:`chunkkv.bench.write_outputs`.
    """
    return Bench(model, config or BenchConfig(), progress=progress, model_label=model_label,
                 model_dir=model_dir, log=log, on_section=on_section).run()
