"""Evaluation tasks for KV-cache compression: a RULER-style synthetic long-context suite."""

from chunkkv.tasks.synthetic import (
    HAYSTACKS,
    TASKS,
    Sample,
    generate_samples,
    score_sample,
    score_samples,
)

__all__ = ["HAYSTACKS", "TASKS", "Sample", "generate_samples", "score_sample", "score_samples"]
