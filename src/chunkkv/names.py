"""The names a user types: methods (with their aliases) and scorings, without importing torch.

The command line checks ``--method`` / ``--methods`` / ``--scoring`` against these before anything
heavy is imported, so a typo is refused at once; :func:`chunkkv.make_method` uses the same table.
``tests/test_cli_speed.py`` checks they are exactly :data:`chunkkv.METHODS` and
:data:`chunkkv.scorers.SCORINGS`.
"""

from __future__ import annotations

from .errors import ChunkKVError

__all__ = ["METHOD_ALIASES", "METHOD_NAMES", "SCORING_NAMES", "canonical_method"]

#: Every method's ``name``, in the order of :data:`chunkkv.METHODS`.
METHOD_NAMES = ("full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv", "chunkkv-kvpress", "snapkv-kvpress")
#: Other spellings :func:`chunkkv.make_method` accepts (after lower-casing and dropping ``_`` and spaces).
METHOD_ALIASES = {"streaming": "streamingllm", "fullkv": "full", "none": "full", "pyramid": "pyramidkv", "snap": "snapkv"}
#: Every scoring name, in the order of :data:`chunkkv.scorers.SCORERS`.
SCORING_NAMES = ("window", "reconstruction", "shallow_reconstruction", "probe", "surprisal", "hybrid", "hybrid_chunked")


def canonical_method(name: str) -> str:
    """The method name ``name`` stands for (``"SnapKV"`` -> ``"snapkv"``, ``"none"`` -> ``"full"``);
    :class:`ChunkKVError` for an unknown one."""
    key = str(name).lower().replace("_", "").replace(" ", "")
    key = METHOD_ALIASES.get(key, key)
    if key not in METHOD_NAMES:
        raise ChunkKVError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHOD_NAMES))}")
    return key
