"""The transformers releases the engine hooks were written against, and the check that enforces them.

The hooks reach into transformers' continuous-batching internals (see ``docs/serving.md``, "Hook points"),
which change from release to release without notice. They were read and tested on 5.25.0; any other
release is refused with one clear line unless ``CHUNKKV_SERVE_ANY_TRANSFORMERS=1`` is set.
"""

from __future__ import annotations

import os

from .errors import ServingError

#: Releases tested: ``>=5.25,<5.26`` (the ``serve`` extra pins the same range).
TESTED_RANGE = ((5, 25), (5, 26))
OVERRIDE_ENV = "CHUNKKV_SERVE_ANY_TRANSFORMERS"


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "0")
    except (IndexError, ValueError):
        return None


def tested_range_text() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED_RANGE
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def check_transformers(version: str | None = None) -> str:
    """Return the installed transformers version, or raise :class:`ServingError` when it is outside the
    tested range (``CHUNKKV_SERVE_ANY_TRANSFORMERS=1`` turns the error off)."""
    if version is None:
        import transformers

        version = transformers.__version__
    parsed = _major_minor(version)
    low, high = TESTED_RANGE
    if parsed is not None and low <= parsed < high:
        return version
    if os.environ.get(OVERRIDE_ENV) == "1":
        return version
    raise ServingError(
        f"chunkkv's serving hooks patch transformers' continuous-batching internals and were tested with "
        f"transformers {tested_range_text()}, but {version} is installed; install the tested release with "
        f"pip install 'chunkkv[serve]' (or set {OVERRIDE_ENV}=1 to try this one at your own risk)"
    )
