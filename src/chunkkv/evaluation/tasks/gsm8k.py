"""GSM8K and many-shot GSM8K as in-context learning under a compressed cache.

The ``k`` chain-of-thought exemplars are the context that is compressed (question-agnostic: the
exemplars do not depend on the test question), then the test question is fed and the model
reasons and answers. ``k`` is ``--num-shots`` (8 and 50 are the paper's settings).

Prompt (no chat template; with one, it all goes into the user message)::

    Question: <exemplar question>
    Answer: <exemplar rationale> The answer is <n>.

    ... (k exemplars) ...
    Question: <test question>
    Answer:

Exemplars are the first ``k`` rows of the shots file (GSM8K ``train`` by default); a rationale is
the ``answer`` field before ``####`` with the calculator annotations ``<<…>>`` removed and line
breaks joined by spaces. Score: exact match of the final number, see
:func:`chunkkv.evaluation.metrics.extract_gsm8k_prediction`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ...errors import ChunkKVError
from ..base import EvalSample, mean
from ..metrics import extract_gsm8k_prediction, gsm8k_exact_match, gsm8k_gold

__all__ = ["GSM8KTask", "format_exemplar", "load_gsm8k"]

MAX_NEW_TOKENS = 256
STOP_STRINGS = ("\n\nQuestion:", "\nQuestion:")
HUB_REPO = "openai/gsm8k"


def format_exemplar(question: str, answer: str) -> str:
    """One chain-of-thought exemplar from a GSM8K row (ends with a blank line)."""
    rationale = re.sub(r"<<[^>]*>>", "", answer.split("####")[0])
    rationale = " ".join(line.strip() for line in rationale.strip().splitlines() if line.strip())
    return f"Question: {question.strip()}\nAnswer: {rationale} The answer is {gsm8k_gold(answer)}.\n\n"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise ChunkKVError(f"{path}:{n + 1}: not a JSON line; GSM8K data is JSONL with "
                                           "'question' and 'answer' fields") from None
                    if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                        raise ChunkKVError(f"{path}:{n + 1}: a GSM8K row needs 'question' and 'answer'")
                    rows.append(row)
    except UnicodeDecodeError:
        raise ChunkKVError(f"{path} is not UTF-8 text (a binary file?); GSM8K data is JSONL") from None
    return rows


def load_gsm8k(split: str, data_file: str | Path | None = None, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """GSM8K rows of ``split`` (``test``/``train``): ``data_file``, or ``{data_dir}/{split}.jsonl``
    (the official ``grade_school_math/data`` files), or the hub's ``openai/gsm8k`` (``main``)."""
    if data_file is not None:
        path = Path(data_file)
        if not path.exists():
            raise ChunkKVError(f"{path}: no such GSM8K file")
        return _read_rows(path)
    if data_dir is not None:
        path = Path(data_dir) / f"{split}.jsonl"
        if not path.exists():
            raise ChunkKVError(f"--data-dir {data_dir} has no {split}.jsonl (GSM8K's official files)")
        return _read_rows(path)
    try:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(HUB_REPO, "main", split=split)]
    except Exception as exc:
        raise ChunkKVError(
            f"could not load GSM8K {split} from the hub ({exc}); pip install datasets, or pass --data-dir with "
            "test.jsonl and train.jsonl (or --data-file / --shots-file)"
        ) from None


class GSM8KTask:
    """``--task gsm8k`` with ``--num-shots k``."""

    name = "gsm8k"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.k = int(config.num_shots)
        if self.k < 0:
            raise ChunkKVError("--num-shots must be >= 0")
        self.subtask = f"gsm8k-{self.k}shot"

    def samples(self, tokenizer: Any) -> list[EvalSample]:
        test = load_gsm8k("test", self.config.data_file, self.config.data_dir)
        shots: list[dict[str, Any]] = []
        if self.k:
            shots = load_gsm8k("train", self.config.shots_file, None if self.config.shots_file else self.config.data_dir)
            if len(shots) < self.k:
                raise ChunkKVError(f"--num-shots {self.k} but the shots file has only {len(shots)} rows")
            shots = shots[: self.k]
        context = "".join(format_exemplar(r["question"], r["answer"]) for r in shots)
        if self.config.limit is not None:
            test = test[: self.config.limit]
        return [
            EvalSample(
                id=f"{self.subtask}/{i}",
                subtask=self.subtask,
                context=context,
                question=f"Question: {row['question'].strip()}\nAnswer:",
                gold=gsm8k_gold(row["answer"]),
                max_new_tokens=MAX_NEW_TOKENS,
                stop_strings=STOP_STRINGS,
                meta={"num_shots": self.k},
            )
            for i, row in enumerate(test)
        ]

    def score(self, sample: EvalSample, prediction: str) -> dict[str, float]:
        sample.meta["extracted"] = extract_gsm8k_prediction(prediction)
        return {"exact_match": gsm8k_exact_match(prediction, sample.gold)}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "accuracy": round(100 * mean([r["scores"]["exact_match"] for r in records]), 2),
            "n": len(records),
            "num_shots": self.k,
            "no_number": sum(1 for r in records if r["meta"].get("extracted") is None),
        }

    def report(self, metrics: dict[str, Any], records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        return [
            "| shots | samples | accuracy (exact match, %) | answers without a number |",
            "|---|---|---|---|",
            f"| {metrics['num_shots']} | {metrics['n']} | {metrics['accuracy']:.2f} | {metrics['no_number']} |",
            "",
        ]
