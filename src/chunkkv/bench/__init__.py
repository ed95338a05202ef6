"""Efficiency benchmark: prefill overhead, decode speed against its bound, memory, kvpress peers.

Command line: ``chunkkv bench`` (see :mod:`chunkkv.bench.cli` and ``docs/benchmarks.md``). Python::

    from chunkkv.bench import BenchConfig, random_llama, run_bench, write_outputs
    model = random_llama("random-100m")
    result = run_bench(model, BenchConfig(contexts=[2048, 4096], peers=False))
    write_outputs(result, "bench-results")      # results.json, report.md, PNG plots
"""

from .measure import MemoryMeter, Stats, expected_kv_bytes, kv_bytes_per_layer
from .models import RANDOM_MODELS, random_llama
from .report import evaluate_targets, to_markdown, write_outputs
from .runner import BenchConfig, run_bench

__all__ = [
    "RANDOM_MODELS", "BenchConfig", "MemoryMeter", "Stats", "evaluate_targets", "expected_kv_bytes",
    "kv_bytes_per_layer", "random_llama", "run_bench", "to_markdown", "write_outputs",
]
