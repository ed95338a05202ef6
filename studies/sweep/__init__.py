"""The quality sweep on the synthetic suite (``chunkkv sweep``, ``python -m studies.sweep``).

Every method x budget x task of :mod:`chunkkv.synthetic` on the shipped 2-layer testbed (or any
model), ChunkKV's chunk-size and reuse-depth sweeps, the Jaccard similarity of adjacent layers'
kept indices, the needle values each method kept, and a NIAH length x depth heatmap. Three modules,
one job each: :mod:`.engine` (configurations, one sample, aggregation, the run), :mod:`.report`
(tables and plots), :mod:`.cli` (flags and the command). The narrative and tables: ``README.md``.
"""

from __future__ import annotations

from .cli import add_arguments, config_from_args, run
from .engine import ALL_METHODS, Entry, Spec, SweepConfig, aggregate, build_entries, run_sweep
from .report import BEGIN, END, budget_label, plot_accuracy, plot_heatmap, render_markdown, write_report

__all__ = ["ALL_METHODS", "BEGIN", "END", "Entry", "Spec", "SweepConfig", "add_arguments", "aggregate", "budget_label",
           "build_entries", "config_from_args", "plot_accuracy", "plot_heatmap", "render_markdown", "run", "run_sweep",
           "write_report"]
