"""Profile of the compression step inside a real prefill: chunkkv's presets against kvpress 0.5.5.

Runs on either side, in its own environment, on the same saved model and the same token ids
(``chunkkv bench``'s prompts: ``Prompts(vocab, seed=0)``), with the default allocator:

    # chunkkv (the main environment; PYTHONPATH picks the checkout to profile)
    python studies/benchmarks/profile_compress.py --side chunkkv --model-dir /tmp/m100 \\
        --context 2048 --threads 1 --methods chunkkv-kvpress,snapkv-kvpress --out chunkkv.json
    # kvpress (its pinned environment, tools/kvpress_env.sh)
    .venv-kvpress/bin/python studies/benchmarks/profile_compress.py --side kvpress --model-dir /tmp/m100 \\
        --context 2048 --threads 1 --methods chunkkv,snapkv --out kvpress.json

``--model-dir DIR`` on the chunkkv side loads ``DIR`` when it holds a model and otherwise writes the
random 100M Llama the bench uses there first. ``profile_compress.py report A.json B.json ...`` prints
the runs side by side (markdown).

What is measured, per method, over ``--repeats`` prefills after one untimed one:

* **step ms**: the compression step of every layer summed, as each side times it (chunkkv:
  ``stats.select_seconds`` of ``compress(..., measure=True)``; kvpress: ``press.compress`` wrapped
  per layer, as ``tools/kvpress_reference.py`` does); the median over the prefills;
* **CPU ms and page faults per layer**: thread CPU time (``time.thread_time``) and minor page
  faults (``getrusage``) of the hooked region, summed over the layers and divided by their count.
  With one thread the CPU time is the step's own work, which a loaded machine does not inflate the
  way it inflates wall time;
* **ops**: one more prefill under ``torch.profiler``; the self CPU time of every operator that runs
  inside the hooked region, by name, summed over the layers (profiler overhead included).

The hooked region is chunkkv's ``_Session.on_attention`` (scoring, selection, the gather of keys
and values, and the copy of the decoding window) and kvpress's ``press.compress`` (query
re-projection, scoring, selection, gather).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def prompt_ids(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """The bench's prompt (``chunkkv.bench.runner.Prompts``): the same ids in either environment."""
    low = min(100, max(0, vocab // 4))
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(low, vocab, (1, length), generator=g, device="cpu")


class Region:
    """Accumulates wall time, thread CPU time and minor faults of a hooked region, and marks it for
    the profiler."""

    def __init__(self) -> None:
        self.calls = 0
        self.cpu = 0.0
        self.wall = 0.0
        self.faults = 0

    def reset(self) -> None:
        self.__init__()

    @contextlib.contextmanager
    def __call__(self):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, w0 = time.thread_time(), time.perf_counter()
        with torch.profiler.record_function("compress_step"):
            yield
        self.wall += time.perf_counter() - w0
        self.cpu += time.thread_time() - c0
        self.faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        self.calls += 1


def op_table(prof, top: int) -> list[dict]:
    """Self CPU time (ms) of the operators below ``compress_step`` events, by name."""
    events = prof.events()
    totals: dict[str, list[float]] = {}

    def inside(ev) -> bool:
        parent = ev.cpu_parent
        while parent is not None:
            if parent.name == "compress_step":
                return True
            parent = parent.cpu_parent
        return False

    for ev in events:
        if ev.name == "compress_step" or not inside(ev):
            continue
        entry = totals.setdefault(ev.name, [0.0, 0])
        entry[0] += ev.self_cpu_time_total / 1e3
        entry[1] += 1
    rows = sorted(({"op": k, "self_ms": round(v[0], 3), "calls": v[1]} for k, v in totals.items()),
                  key=lambda r: -r["self_ms"])
    return rows[:top]


def run_chunkkv(args, region: Region) -> dict:
    import chunkkv  # whichever checkout PYTHONPATH names (profile the code before and after a change)
    from chunkkv import inline
    from chunkkv.methods import make_method

    model = load_chunkkv_model(args)
    original = inline._Session.on_attention

    def hooked(self, *a, **k):
        with region():
            return original(self, *a, **k)

    inline._Session.on_attention = hooked
    ids = prompt_ids(model.config.vocab_size, args.context, args.seed)
    out = {"side": "chunkkv", "chunkkv_file": chunkkv.__file__, "methods": {}}
    for name in args.methods:
        method = make_method(name, remove_fraction=round(1 - args.budget, 10)) if "kvpress" in name else \
            make_method(name, keep_fraction=args.budget)
        chunkkv.compress(model, ids, method=method, measure=True)  # untimed
        steps, cpu, faults, prefill = [], [], [], []
        for _ in range(args.repeats):
            region.reset()
            ctx = chunkkv.compress(model, ids, method=method, measure=True)
            steps.append(ctx.stats.select_seconds * 1e3)
            prefill.append(ctx.stats.prefill_seconds * 1e3)
            cpu.append(region.cpu * 1e3 / max(1, region.calls))
            faults.append(region.faults / max(1, region.calls))
            del ctx
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            chunkkv.compress(model, ids, method=method, measure=True)
        out["methods"][name] = summary(name, method.describe(), steps, prefill, cpu, faults, op_table(prof, args.top))
    return out


def load_chunkkv_model(args):
    from chunkkv.bench.models import random_llama

    if args.model_dir and Path(args.model_dir, "config.json").exists():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
        return model
    model = random_llama("random-100m")
    if args.model_dir:
        model.save_pretrained(args.model_dir)
    return model


def run_kvpress(args, region: Region) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import kvpress_reference as ref

    model = ref.load_model(Path(args.model_dir), "sdpa", "cpu")
    ids = prompt_ids(model.config.vocab_size, args.context, args.seed)
    out = {"side": "kvpress", "kvpress_version": ref.pkg_version("kvpress"), "methods": {}}
    ratio = round(1 - args.budget, 10)
    for name in args.methods:
        press = ref.build_press({"press": name, "compression_ratio": ratio})
        original = press.compress
        per_prefill: list[float] = []

        def timed(*a, **k):
            t0 = time.perf_counter()
            with region():
                result = original(*a, **k)
            per_prefill.append(time.perf_counter() - t0)
            return result

        press.compress = timed
        ref.prefill(model, ids, press)  # untimed
        steps, cpu, faults, prefill = [], [], [], []
        for _ in range(args.repeats):
            region.reset()
            per_prefill.clear()
            t0 = time.perf_counter()
            ref.prefill(model, ids, press)
            prefill.append((time.perf_counter() - t0) * 1e3)
            steps.append(sum(per_prefill) * 1e3)
            cpu.append(region.cpu * 1e3 / max(1, region.calls))
            faults.append(region.faults / max(1, region.calls))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ref.prefill(model, ids, press)
        out["methods"][name] = summary(name, repr(press), steps, prefill, cpu, faults, op_table(prof, args.top))
        del press.compress
    return out


def summary(name, what, steps, prefill, cpu, faults, ops) -> dict:
    med = statistics.median
    return {
        "what": what,
        "step_ms": round(med(steps), 3), "step_ms_samples": [round(x, 3) for x in steps],
        "prefill_ms": round(med(prefill), 1),
        "cpu_ms_per_layer": round(med(cpu), 3),
        "faults_per_layer": round(med(faults), 1),
        "ops": ops,
    }


def report(paths: list[str], top: int = 8) -> str:
    """Markdown: one row per (file, method) with the step and its per-layer CPU time and page faults,
    then each one's heaviest operators."""
    runs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    lines = ["| run | side | context | method | step ms (all layers, median) | CPU ms / layer | page faults / layer | "
             "prefill ms |", "|---|---|---|---|---|---|---|---|"]
    for label, r in runs:
        for name, m in r["methods"].items():
            lines.append(f"| {label} | {r['side']} | {r['context']} | {name} | {m['step_ms']:.1f} | "
                         f"{m['cpu_ms_per_layer']:.2f} | {m['faults_per_layer']:.0f} | {m['prefill_ms']:.0f} |")
    for label, r in runs:
        for name, m in r["methods"].items():
            ops = ", ".join(f"{o['op'].replace('aten::', '')} {o['self_ms']:.1f}" for o in m["ops"][:top])
            lines.append(f"\n*{label}, {name}* (self ms over all layers, profiler on): {ops}")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "report":
        print(report(argv[1:]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=("chunkkv", "kvpress"), required=True)
    p.add_argument("--model-dir", help="saved model folder (kvpress side: required)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--budget", type=float, default=0.1, help="share kept (0.1)")
    p.add_argument("--methods", default=None,
                   help="chunkkv: method names (default chunkkv-kvpress,snapkv-kvpress); kvpress: chunkkv,snapkv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    default = "chunkkv-kvpress,snapkv-kvpress" if args.side == "chunkkv" else "chunkkv,snapkv"
    args.methods = [m.strip() for m in (args.methods or default).split(",") if m.strip()]
    if args.side == "kvpress" and not args.model_dir:
        p.error("--side kvpress needs --model-dir")
    torch.set_num_threads(args.threads)
    region = Region()
    with torch.inference_mode():
        result = run_chunkkv(args, region) if args.side == "chunkkv" else run_kvpress(args, region)
    result.update(context=args.context, threads=torch.get_num_threads(), torch=torch.__version__,
                  load=os.getloadavg(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    for name, m in result["methods"].items():
        print(f"{result['side']} {name}: step {m['step_ms']:.1f} ms (all layers), {m['cpu_ms_per_layer']:.2f} CPU ms and "
              f"{m['faults_per_layer']:.0f} page faults per layer; prefill {m['prefill_ms']:.0f} ms")
        for op in m["ops"]:
            print(f"    {op['op']:<32} {op['self_ms']:9.2f} ms  x{op['calls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
