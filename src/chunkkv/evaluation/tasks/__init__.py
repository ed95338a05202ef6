"""The benchmarks, by ``--task`` name: ``niah``, ``longbench[:t1,t2]``, ``gsm8k``, ``jailbreakv``,
``synthetic[:task]``."""

from __future__ import annotations

from typing import Any

from ...errors import ChunkKVError
from ..base import Task

TASK_NAMES = ("niah", "longbench", "gsm8k", "jailbreakv", "synthetic")


def build_task(config: Any) -> Task:
    """The task object for ``config.task`` (cheap: no data is loaded until ``samples``)."""
    name, _, sub = str(config.task).partition(":")
    name = name.strip().lower()
    if name == "niah":
        from .niah import NIAHTask

        return NIAHTask(config)
    if name == "longbench":
        from .longbench import LongBenchTask

        return LongBenchTask(config, sub or None)
    if name == "gsm8k":
        from .gsm8k import GSM8KTask

        return GSM8KTask(config)
    if name == "jailbreakv":
        from .jailbreakv import JailbreakVTask

        return JailbreakVTask(config)
    if name == "synthetic":
        from .synthetic import SyntheticTask

        return SyntheticTask(config, sub or None)
    raise ChunkKVError(f"unknown task {config.task!r}; choose one of {', '.join(TASK_NAMES)} (e.g. longbench:qasper)")


__all__ = ["TASK_NAMES", "build_task"]
