"""Evaluation harness: NIAH, LongBench, GSM8K (many-shot), JailbreakV and the synthetic suite.

Command line: ``chunkkv eval --model M --task T --method chunkkv --keep-fraction 0.1 --out DIR``
(see ``docs/evaluation.md``). Python::

    from chunkkv.evaluation import run_eval
    metrics = run_eval(model, tokenizer, task="niah", out_dir="runs/niah", method=method, lengths=[2000, 4000])

Modules: ``metrics`` (pure scoring functions), ``prompting`` (chat template and the
context/question split), ``store`` (append-only JSONL, resume, merge), ``distributed`` (sharding),
``runner`` (generation loop, metrics files), ``tasks`` (one module per benchmark).
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "EvalSample": "base", "Shard": "distributed", "shard_info": "distributed", "EvalConfig": "config",
    "Generator": "runner", "merge_results": "runner", "run_eval": "runner", "TASK_NAMES": "tasks", "build_task": "tasks",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
