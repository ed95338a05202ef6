"""Command-line commands (see ``chunkkv.cli``)."""
