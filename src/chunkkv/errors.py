"""Errors raised by chunkkv.

Every error says what was wrong and how to fix it. They subclass :class:`ValueError` (or
:class:`TypeError`) so callers that already catch those keep working.
"""

from __future__ import annotations


class ChunkKVError(ValueError):
    """Base class for bad input to chunkkv: a budget, a prompt, a model or a setting."""


class BudgetError(ChunkKVError):
    """The compression budget is missing, ambiguous or out of range."""


class PromptError(ChunkKVError):
    """The prompt cannot be compressed as given (empty, mis-shaped, inconsistent mask)."""


class UnsupportedModelError(ChunkKVError):
    """The model's layers or attention implementation cannot be hooked by chunkkv."""
