"""``python -m studies.question_agnostic NAME [flags]``: run one of the question-agnostic studies."""

from __future__ import annotations

import importlib
import sys

STUDIES = {
    "niah": "decoded NIAH: every scoring x method x budget, 4 questions per compressed document (resumable)",
    "table": "the tables of a niah JSONL file (default results/niah.jsonl), Wilson intervals",
    "tune": "dev set: chunkings and sentence scores on surprisal, needles kept (no decoding)",
    "shallow_dev": "dev set: which layers' reconstruction attention keeps the answers",
    "plain_dev": "dev set of plainly worded needles: sentence scores of the hybrid default",
    "cost": "scoring time over the prefill for each scoring, through chunkkv.compress",
    "saved_demo": "compress once, save, reload in a new process, answer 4 questions the same way",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STUDIES:
        asked_help = bool(argv) and argv[0] in ("-h", "--help")
        lines = ["usage: python -m studies.question_agnostic NAME [flags]   (NAME --help for its flags)", ""]
        lines += [f"  {name:<12} {text}" for name, text in STUDIES.items()]
        print("\n".join(lines), file=sys.stdout if asked_help else sys.stderr)
        return 0 if asked_help else 2
    module = importlib.import_module(f".{argv[0]}", __package__)
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
