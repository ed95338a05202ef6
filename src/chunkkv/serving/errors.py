"""Errors of the serving integration (all :class:`chunkkv.errors.ChunkKVError`, so the CLI prints one line)."""

from __future__ import annotations

from ..errors import ChunkKVError


class ServingError(ChunkKVError):
    """The engine, its configuration or the installed transformers cannot run compressed requests."""
