"""Full-cache accuracy of a model on the synthetic suite (greedy ``model.generate``)."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from chunkkv.synthetic import TASKS, Sample, generate_samples, score_sample

__all__ = ["generate_answer", "evaluate", "format_table"]


@torch.no_grad()
def generate_answer(model, tokenizer, sample: Sample, max_new_tokens: int | None = None) -> str:
    """Greedy continuation of ``sample.prompt`` with the full KV cache, decoded to text."""
    device = next(model.parameters()).device
    enc = tokenizer(sample.prompt, return_tensors="pt").to(device)
    if max_new_tokens is None:
        # The canonical answer plus slack; the model stops itself at </s>.
        max_new_tokens = len(tokenizer(sample.meta["target"], add_special_tokens=False).input_ids) + 8
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (1024, 2048),
    n: int | dict[int, int] = 20,
    seed: int = 1234,
    haystack: str = "varied",
    log=None,
) -> dict[str, dict[int, float]]:
    """Mean score per task and length. ``n`` may map length -> number of samples."""
    model.eval()
    table: dict[str, dict[int, float]] = {}
    for length in lengths:
        k = n[length] if isinstance(n, dict) else n
        for task in tasks:
            t0 = time.time()
            samples = generate_samples(task, k, length, seed=seed, tokenizer=tokenizer, haystack=haystack)
            scores = [score_sample(generate_answer(model, tokenizer, s), s.answers) for s in samples]
            table.setdefault(task, {})[length] = sum(scores) / len(scores)
            if log:
                log(f"{task:16s} {length:5d} n={k:3d} score={table[task][length]:.3f} ({time.time() - t0:.1f}s)")
    return table


def format_table(table: dict[str, dict[int, float]]) -> str:
    """Markdown table, tasks as rows, lengths as columns, scores in percent."""
    lengths = sorted({l for row in table.values() for l in row})
    lines = ["| task | " + " | ".join(f"{l}" for l in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for task, row in table.items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * row[l]:.1f}" if l in row else "-" for l in lengths) + " |")
    return "\n".join(lines)
