"""The research studies behind chunkkv's measured numbers (not part of the installed library).

Each study is a package run from the repository root as ``python -m studies.<name> ...``; what each
measures, on which model and text, and the command that regenerates each table are listed in
``studies/README.md``. The studies use the library only through its public modules (``chunkkv.*``);
their results live next to them (``studies/<name>/results/``).
"""

from __future__ import annotations

from pathlib import Path

#: The repository root (the folder holding ``studies/`` and ``src/``): default paths resolve against it.
ROOT = Path(__file__).resolve().parents[1]


def shown(path: Path) -> str:
    """``path`` as written in reports and help texts: relative to the repository root when inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def emit(lines: list[str], out: str | Path | None = None) -> None:
    """Print ``lines``, and append them to the file ``out`` when given."""
    print("\n".join(lines), flush=True)
    if out:
        with Path(out).open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
