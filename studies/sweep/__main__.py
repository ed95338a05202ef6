"""``python -m studies.sweep [flags]``: the sweep, with the same flags as ``chunkkv sweep``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
