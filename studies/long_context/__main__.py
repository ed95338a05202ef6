"""``python -m studies.long_context run|report|cost [flags]``: the grid, its tables, the cost at length."""

from __future__ import annotations

import sys

USAGE = ("usage: python -m studies.long_context {run,report,cost} [flags]\n"
         "  run     run (or resume) the grid, appending to <out>/records.jsonl   (run --help)\n"
         "  report  tables from the records into the README                      (report --help)\n"
         "  cost    KV bytes, peak memory, prefill and decode time at length      (cost --help)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "report", "cost"):
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "run":
        from .grid import main as run
    elif argv[0] == "report":
        from .report import main as run
    else:
        from .cost import main as run
    return run(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
