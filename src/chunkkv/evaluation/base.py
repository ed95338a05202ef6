"""What every benchmark hands the runner: samples to answer, and how to score and summarise them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["EvalSample", "Task", "mean"]


@dataclass
class EvalSample:
    """One prompt to answer.

    The prompt is ``context`` followed by ``question``. In the default, question-agnostic mode the
    context is compressed on its own and the question is fed afterwards; with ``--query-aware``
    the whole prompt is compressed. With a chat template both go into one user message and the
    split point stays between them.

    Attributes:
        id: unique within the run (``"<subtask>/<sample id>"``); the resume key.
        subtask: the benchmark part it belongs to (``"qasper"``, ``"niah"`` …), for aggregation.
        gold: what the scorer compares against (list of answers, a number, None …); stored as is.
        max_new_tokens: the benchmark's generation length (``--max-new-tokens`` overrides it).
        chat: False where the benchmark never applies a chat template to this prompt.
        stop_strings: the prediction is cut at the first of these (applied after decoding).
        stop_newline: also stop decoding at a newline token (LongBench's samsum rule).
        min_new_tokens: stop tokens are masked for this many first tokens (0 or 1).
        meta: anything the scorer or the report needs (kept in the output record).
    """

    id: str
    subtask: str
    context: str
    question: str
    gold: Any
    max_new_tokens: int
    chat: bool = True
    stop_strings: tuple[str, ...] = ()
    stop_newline: bool = False
    min_new_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A benchmark. Construction must be cheap (no data loading): ``--merge`` builds a task only to
    aggregate records it reads back."""

    name: str

    def samples(self, tokenizer: Any) -> list[EvalSample]:
        """Every sample of the run in a fixed order (``--limit`` applied per subtask)."""

    def score(self, sample: EvalSample, prediction: str) -> dict[str, float]:
        """Per-sample scores; the first key is the primary score."""

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics over finished records (each has ``subtask``, ``scores``, ``meta``)."""

    def report(self, metrics: dict[str, Any], records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        """Markdown lines for ``summary.md``; may write figures into ``out_dir``."""


def mean(values: list[float]) -> float:
    """Arithmetic mean (0.0 for an empty list)."""
    return sum(values) / len(values) if values else 0.0
