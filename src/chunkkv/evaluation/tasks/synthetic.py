"""The RULER-style synthetic suite of :mod:`chunkkv.synthetic` as ``--task synthetic[:<task>]``.

Samples come from ``generate_samples(task, n, length, seed, tokenizer, depth, haystack)`` for every
length of ``--lengths`` (and every depth of ``--depths``, if given); the score is the suite's
``score_sample`` (RULER ``string_match_all``: share of the gold strings found in the prediction).
The suite module is imported only when such a task runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ...errors import ChunkKVError
from ..base import EvalSample, mean

__all__ = ["SyntheticTask", "synthetic_module"]

DEFAULT_LENGTHS = [1024, 2048, 4096]
#: Generation lengths as RULER sets them (niah 128, variable tracking 30).
MAX_NEW_TOKENS = {"vt": 30}
DEFAULT_MAX_NEW_TOKENS = 128


def synthetic_module() -> Any:
    """``chunkkv.synthetic``, or a clear error if this installation does not have it."""
    try:
        return importlib.import_module("chunkkv.synthetic")
    except ImportError as exc:
        raise ChunkKVError(f"the synthetic tasks are not available in this installation ({exc})") from None


class SyntheticTask:
    """``--task synthetic`` (every task of the suite) or ``synthetic:niah_single[,vt…]``."""

    name = "synthetic"

    def __init__(self, config: Any, subtasks: str | None = None) -> None:
        self.config = config
        self.spec = subtasks

    def tasks(self) -> list[str]:
        known = list(synthetic_module().TASKS)
        if not self.spec or self.spec == "all":
            return known
        names = [s.strip() for s in self.spec.split(",") if s.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ChunkKVError(f"unknown synthetic task(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        return names

    def samples(self, tokenizer: Any) -> list[EvalSample]:
        mod = synthetic_module()
        lengths = [int(x) for x in (self.config.lengths or DEFAULT_LENGTHS)]
        depths = self.config.depths if self.config.depths is not None else [None]
        out = []
        for task in self.tasks():
            part = []
            for length in lengths:
                for depth in depths:
                    generated = mod.generate_samples(
                        task, self.config.num_samples, length, seed=self.config.seed, tokenizer=tokenizer,
                        depth=depth, haystack=self.config.synthetic_haystack,
                    )
                    for i, s in enumerate(generated):
                        dtag = "-" if depth is None else f"{float(depth):g}"
                        part.append(
                            EvalSample(
                                id=f"{task}/L{length}/D{dtag}/{i}",
                                subtask=task,
                                context=s.context,
                                question=" " + s.question,
                                gold=list(s.answers),
                                max_new_tokens=MAX_NEW_TOKENS.get(task, DEFAULT_MAX_NEW_TOKENS),
                                meta={"length": length, "depth": depth, "measured_length": s.meta.get("length"),
                                      "target": s.meta.get("target")},
                            )
                        )
            if self.config.limit is not None:
                part = part[: self.config.limit]
            out += part
        return out

    def score(self, sample: EvalSample, prediction: str) -> dict[str, float]:
        return {"score": float(synthetic_module().score_sample(prediction, sample.gold))}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        by_task: dict[str, list[float]] = {}
        by_len: dict[str, dict[str, list[float]]] = {}
        for r in records:
            by_task.setdefault(r["subtask"], []).append(r["scores"]["score"])
            by_len.setdefault(r["subtask"], {}).setdefault(str(r["meta"]["length"]), []).append(r["scores"]["score"])
        tasks = {t: round(100 * mean(v), 2) for t, v in by_task.items()}
        return {
            "tasks": tasks,
            "by_length": {t: {n: round(100 * mean(v), 2) for n, v in sorted(d.items(), key=lambda kv: int(kv[0]))}
                          for t, d in by_len.items()},
            "counts": {t: len(v) for t, v in by_task.items()},
            "average": round(mean(list(tasks.values())), 2),
        }

    def report(self, metrics: dict[str, Any], records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        lengths = sorted({n for d in metrics["by_length"].values() for n in d}, key=int)
        lines = ["| task | samples | " + " | ".join(lengths) + " | all |", "|---" * (len(lengths) + 3) + "|"]
        for t, s in metrics["tasks"].items():
            cells = [f"{metrics['by_length'][t][n]:.1f}" if n in metrics["by_length"][t] else "" for n in lengths]
            lines.append(f"| {t} | {metrics['counts'][t]} | " + " | ".join(cells) + f" | {s:.2f} |")
        lines += ["| **average** | | " + " | ".join("" for _ in lengths) + f" | **{metrics['average']:.2f}** |", ""]
        return lines
