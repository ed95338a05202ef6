"""``python -m chunkkv``: the ``chunkkv`` command."""

from .cli import main

raise SystemExit(main())
