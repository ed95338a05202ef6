"""LongBench (v1), the 16 English tasks, with the official prompts, lengths and metrics.

Reproduced from the LongBench repository (``config/dataset2prompt.json``,
``config/dataset2maxlen.json``, ``eval.py``, ``metrics.py``, ``pred.py``):

* the prompt template and the maximum generation length of each task;
* middle truncation: a prompt longer than ``max_length`` tokens keeps its first and last
  ``max_length // 2`` tokens (the cut is made inside the context, see :func:`build_sample`);
* no chat template for trec, triviaqa, samsum, lsht, lcc and repobench-p;
* samsum stops at a newline and may not stop on its first token (official ``min_length``);
* trec, triviaqa, samsum and lsht predictions are cut to their first line before scoring;
* each sample's score is its best over the gold answers; task scores are ``100 × mean``.

Data: the official JSONL files (``{task}.jsonl`` with ``input``, ``context``, ``answers``,
``length``, ``dataset``, ``language``, ``all_classes``, ``_id``) from ``--data-dir``, or the hub's
``THUDM/LongBench`` ``data.zip`` (downloaded once into ``~/.cache/chunkkv/longbench``), or, if that
fails, ``datasets.load_dataset("THUDM/LongBench", task)``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ChunkKVError
from ..base import EvalSample, mean
from ..metrics import (
    best_of,
    classification_score,
    code_sim_score,
    count_score,
    first_line,
    qa_f1_score,
    retrieval_score,
    rouge_l_score,
)

__all__ = [
    "CATEGORIES", "DATASET2MAXLEN", "DATASET2METRIC", "DATASET2PROMPT", "FIRST_LINE_TASKS", "LONGBENCH_TASKS",
    "LongBenchTask", "NO_CHAT_TASKS", "build_sample", "load_longbench",
]

#: The 16 English tasks, in the order of the paper's tables.
LONGBENCH_TASKS: list[str] = [
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
    "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]

CATEGORIES: dict[str, list[str]] = {
    "single-doc QA": ["narrativeqa", "qasper", "multifieldqa_en"],
    "multi-doc QA": ["hotpotqa", "2wikimqa", "musique"],
    "summarization": ["gov_report", "qmsum", "multi_news"],
    "few-shot": ["trec", "triviaqa", "samsum"],
    "synthetic": ["passage_count", "passage_retrieval_en"],
    "code": ["lcc", "repobench-p"],
}

_NO_EXPLAIN = "Do not provide any explanation."
_QASPER_RULES = (
    'If the question cannot be answered based on the information in the article, write "unanswerable". '
    'If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.'
)
_PASSAGES = "Answer the question based on the given passages. Only give me the answer and do not output any other words."

DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        f"as concisely as you can, using a single phrase if possible. {_NO_EXPLAIN}\n\nStory: {{context}}\n\nNow, "
        "answer the question based on the story as concisely as you can, using a single phrase if possible. "
        f"{_NO_EXPLAIN}\n\nQuestion: {{input}}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        f"single phrase or sentence if possible. {_QASPER_RULES}\n\nArticle: {{context}}\n\n Answer the question "
        "based on the above article as concisely as you can, using a single phrase or sentence if possible. "
        f"{_QASPER_RULES}\n\nQuestion: {{input}}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "hotpotqa": f"{_PASSAGES}\n\nThe following are given passages.\n{{context}}\n\n{_PASSAGES}\n\nQuestion: {{input}}\nAnswer:",
    "2wikimqa": f"{_PASSAGES}\n\nThe following are given passages.\n{{context}}\n\n{_PASSAGES}\n\nQuestion: {{input}}\nAnswer:",
    "musique": f"{_PASSAGES}\n\nThe following are given passages.\n{{context}}\n\n{_PASSAGES}\n\nQuestion: {{input}}\nAnswer:",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score, "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score, "musique": qa_f1_score, "gov_report": rouge_l_score, "qmsum": rouge_l_score,
    "multi_news": rouge_l_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_l_score,
    "passage_count": count_score, "passage_retrieval_en": retrieval_score, "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

#: Tasks whose prompts the official script never wraps in a chat template.
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
#: Tasks whose predictions are cut to the first line before scoring.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

HUB_REPO = "THUDM/LongBench"


def parse_subtasks(spec: str | None) -> list[str]:
    """``None``/``"all"``/``"en"`` → the 16 tasks; else a comma list of task names."""
    if not spec or spec in ("all", "en"):
        return list(LONGBENCH_TASKS)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in DATASET2PROMPT]
    if unknown:
        raise ChunkKVError(f"unknown LongBench task(s) {', '.join(unknown)}; choose from {', '.join(LONGBENCH_TASKS)}")
    return names


def _cache_dir() -> Path:
    return Path(os.environ.get("CHUNKKV_CACHE", "~/.cache/chunkkv")).expanduser() / "longbench"


def _hub_data_dir() -> Path:
    """Folder of the official JSONL files, from the hub's ``data.zip`` (extracted once)."""
    target = _cache_dir()
    if (target / "data").is_dir() and any((target / "data").glob("*.jsonl")):
        return target / "data"
    from huggingface_hub import hf_hub_download

    archive = hf_hub_download(HUB_REPO, "data.zip", repo_type="dataset")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        z.extractall(target)
    return target / "data"


def load_longbench(task: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows of one task: ``{data_dir}/{task}.jsonl`` (or ``{data_dir}/data/{task}.jsonl``), else from the hub."""
    if data_dir is not None:
        folder = Path(data_dir)
        candidates = [folder / f"{task}.jsonl", folder / "data" / f"{task}.jsonl"]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise ChunkKVError(f"--data-dir {folder} has no {task}.jsonl (the official LongBench files, from data.zip)")
    else:
        try:
            path = _hub_data_dir() / f"{task}.jsonl"
        except Exception as zip_error:  # network, auth, missing huggingface_hub …
            return _rows_from_datasets(task, zip_error)
        if not path.exists():
            raise ChunkKVError(f"the hub's LongBench data has no {task}.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if line.strip():
                row = json.loads(line)
                missing = [k for k in ("input", "context", "answers") if k not in row]
                if missing:
                    raise ChunkKVError(f"{path}:{n + 1} lacks the field(s) {', '.join(missing)}")
                row.setdefault("_id", str(n))
                rows.append(row)
    return rows


def _rows_from_datasets(task: str, zip_error: Exception) -> list[dict[str, Any]]:
    """Second hub route: ``datasets.load_dataset("THUDM/LongBench", task, split="test")``."""
    try:
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset(HUB_REPO, task, split="test")]
    except Exception as exc:
        raise ChunkKVError(
            f"could not fetch LongBench from the hub (data.zip: {zip_error}; datasets: {exc}); download data.zip "
            f"from the {HUB_REPO} dataset, unzip it and pass --data-dir <folder>/data"
        ) from None
    for n, row in enumerate(rows):
        row.setdefault("_id", str(n))
    return rows


def _ntokens(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def build_sample(row: dict[str, Any], task: str, tokenizer: Any, max_length: int) -> EvalSample:
    """One LongBench sample: the official prompt, middle-truncated to ``max_length`` tokens.

    The context part is ``instruction + context`` (everything up to the end of ``{context}`` in
    the template), the question part the rest of the template (question and answer cue). When
    the prompt is too long, the official rule keeps its first and last ``max_length // 2``
    tokens. If the instruction and the question part are each shorter than that half (always
    the case at real window sizes) the cut falls inside the context and is made there, so both
    parts keep their text; otherwise the official cut is applied to the whole prompt, which
    then cannot be split: it is all context (``meta["split_lost"]``), compressed as a whole.
    """
    from ...prompting import long_text

    template = DATASET2PROMPT[task]
    before, after = template.split("{context}")
    fields = {k: ("" if v is None else v) for k, v in row.items() if isinstance(v, (str, int, float)) or v is None}
    fields.setdefault("input", "")
    head, tail = before.format(**fields), after.format(**fields)
    context = row["context"]
    n_head = len(tokenizer(head, add_special_tokens=True)["input_ids"])  # counts BOS, as the official script does
    with long_text(tokenizer):  # a context longer than the model is cut in the middle below
        ctx_ids = _ntokens(tokenizer, context, False)
    n_tail = len(_ntokens(tokenizer, tail, False))
    meta = {"length": row.get("length"), "all_classes": row.get("all_classes"), "truncated": False}
    if n_head + len(ctx_ids) + n_tail > max_length:
        half = max_length // 2
        meta["truncated"] = True
        if n_head <= half and n_tail <= half:
            front, back = half - n_head, half - n_tail
            first = tokenizer.decode(ctx_ids[:front], skip_special_tokens=True)
            last = tokenizer.decode(ctx_ids[len(ctx_ids) - back :], skip_special_tokens=True)
            # Decoding a piece can drop the context's own leading/trailing whitespace (the
            # template's neighbouring text relies on it); keep it.
            lead, trail = context[: len(context) - len(context.lstrip())], context[len(context.rstrip()) :]
            context = lead + (first + last).strip() + trail
        else:
            with long_text(tokenizer):
                full = list(tokenizer(head + context + tail, add_special_tokens=True)["input_ids"])
            text = tokenizer.decode(full[:half], skip_special_tokens=True) + tokenizer.decode(
                full[len(full) - half :], skip_special_tokens=True
            )
            head, context, tail = "", text, ""
            meta["split_lost"] = True
    return EvalSample(
        id=f"{task}/{row['_id']}",
        subtask=task,
        context=head + context,
        question=tail,
        gold=list(row["answers"]),
        max_new_tokens=DATASET2MAXLEN[task],
        chat=task not in NO_CHAT_TASKS,
        stop_newline=task == "samsum",
        min_new_tokens=1 if task == "samsum" else 0,
        meta=meta,
    )


def score_prediction(task: str, prediction: str, answers: list[str], all_classes: list[str] | None) -> float:
    """The official per-sample score (0..1): first-line rule, then the best over the answers."""
    if task in FIRST_LINE_TASKS:
        prediction = first_line(prediction)
    return best_of(DATASET2METRIC[task], prediction, answers, all_classes=all_classes)


class LongBenchTask:
    """``--task longbench`` (all 16 English tasks) or ``longbench:qasper,hotpotqa``."""

    name = "longbench"

    def __init__(self, config: Any, subtasks: str | None = None) -> None:
        self.config = config
        self.tasks = parse_subtasks(subtasks)

    def max_length(self, tokenizer: Any) -> int:
        if self.config.max_length:
            return int(self.config.max_length)
        window = getattr(self.config, "model_max_positions", None)
        if not window:
            raise ChunkKVError("give --max-length (prompt tokens after middle truncation)")
        return int(window) - max(DATASET2MAXLEN[t] for t in self.tasks)

    def samples(self, tokenizer: Any) -> list[EvalSample]:
        max_length = self.max_length(tokenizer)
        out = []
        for task in self.tasks:
            rows = load_longbench(task, self.config.data_dir)
            if self.config.limit is not None:
                rows = rows[: self.config.limit]
            out += [build_sample(row, task, tokenizer, max_length) for row in rows]
        return out

    def score(self, sample: EvalSample, prediction: str) -> dict[str, float]:
        return {"score": score_prediction(sample.subtask, prediction, sample.gold, sample.meta.get("all_classes"))}

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        by_task: dict[str, list[float]] = {}
        for r in records:
            by_task.setdefault(r["subtask"], []).append(r["scores"]["score"])
        tasks = {t: round(100 * mean(by_task[t]), 2) for t in LONGBENCH_TASKS if t in by_task}
        categories = {
            c: round(mean([tasks[t] for t in members if t in tasks]), 2)
            for c, members in CATEGORIES.items()
            if any(t in tasks for t in members)
        }
        return {
            "tasks": tasks,
            "counts": {t: len(by_task[t]) for t in tasks},
            "categories": categories,
            "average": round(mean(list(tasks.values())), 2),
            "complete": all(t in tasks for t in LONGBENCH_TASKS),
        }

    def report(self, metrics: dict[str, Any], records: list[dict[str, Any]], out_dir: Path) -> list[str]:
        cat_of = {t: c for c, members in CATEGORIES.items() for t in members}
        lines = ["| task | category | samples | score |", "|---|---|---|---|"]
        for t, s in metrics["tasks"].items():
            lines.append(f"| {t} | {cat_of[t]} | {metrics['counts'][t]} | {s:.2f} |")
        lines += ["", "| category | score |", "|---|---|"]
        lines += [f"| {c} | {s:.2f} |" for c, s in metrics["categories"].items()]
        note = "" if metrics["complete"] else " (over the tasks run, not all 16)"
        lines += [f"| **average**{note} | **{metrics['average']:.2f}** |", ""]
        return lines
