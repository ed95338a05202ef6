"""Evaluation harness: NIAH, LongBench, GSM8K (many-shot), JailbreakV and the synthetic suite.

Command line: ``chunkkv eval --model M --task T --method chunkkv --keep-fraction 0.1 --out DIR``
(see ``docs/evaluation.md``). Python::

    from chunkkv.evaluation import run_eval
    metrics = run_eval(model, tokenizer, task="niah", out_dir="runs/niah", method=method, lengths=[2000, 4000])

Modules: ``metrics`` (pure scoring functions), ``prompting`` (chat template and the
context/question split), ``store`` (append-only JSONL, resume, merge), ``distributed`` (sharding),
``runner`` (generation loop, metrics files), ``tasks`` (one module per benchmark).
"""

from .base import EvalSample
from .distributed import Shard, shard_info
from .runner import EvalConfig, Generator, merge_results, run_eval
from .tasks import TASK_NAMES, build_task

__all__ = [
    "EvalConfig", "EvalSample", "Generator", "Shard", "TASK_NAMES", "build_task", "merge_results", "run_eval",
    "shard_info",
]
