"""Efficiency benchmark: prefill overhead, decode speed against its bound, memory, kvpress peers.

Command line: ``chunkkv bench`` (see :mod:`chunkkv.bench.cli` and ``docs/benchmarks.md``). Python::

    from chunkkv.bench import BenchConfig, random_llama, run_bench, write_outputs
    model = random_llama("random-100m")
    result = run_bench(model, BenchConfig(contexts=[2048, 4096], peers=False))
    write_outputs(result, "bench-results")      # results.json, report.md, PNG plots
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "MemoryMeter": "measure", "Stats": "measure", "expected_kv_bytes": "measure", "kv_bytes_per_layer": "measure",
    "RANDOM_MODELS": "models", "random_llama": "models", "evaluate_targets": "report", "to_markdown": "report",
    "write_outputs": "report", "BenchConfig": "runner", "run_bench": "runner",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
