"""``chunkkv`` command line: one dispatcher, one module per command.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported only
when its command runs, so ``chunkkv --help`` stays fast. ``chunkkv sweep`` is a study, not part of
the installed package: its module lives in ``studies/sweep`` of a source checkout (next to ``src/``,
or in the current folder), and an installed wheel says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import __version__
from .errors import ChunkKVError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("chunkkv.commands.demo", "offline demo on SmolLM2 and the Paul Graham essays: full vs SnapKV vs ChunkKV"),
    "generate": ("chunkkv.commands.generate", "answer questions about a long context with a compressed cache"),
    "eval": ("chunkkv.evaluation.cli", "run a benchmark (NIAH, LongBench, GSM8K, JailbreakV, synthetic)"),
    "bench": ("chunkkv.bench.cli", "efficiency benchmark: memory, prefill overhead, decode speed"),
    "inspect": ("chunkkv.commands.inspect", "HTML report of what each method kept, layer by layer"),
    "serve": ("chunkkv.commands.serve", "OpenAI-compatible server (transformers serve, continuous batching), ChunkKV on every request"),
    "sweep": ("studies.sweep.cli", "quality sweep on the synthetic suite: methods x budgets x tasks, chunk sizes, reuse depths, "
                                   "Jaccard (a study: runs from a source checkout)"),
}


def studies_root() -> Path | None:
    """The source checkout whose ``studies/`` package the study commands run: the repository of this
    source tree (``src/chunkkv`` -> its root, the editable install), else the current folder; None
    when neither holds ``studies/`` (an installed wheel run elsewhere)."""
    here = Path(__file__).resolve().parents[2]
    for root in (here, Path.cwd()):
        if (root / "studies" / "__init__.py").is_file():
            return root
    return None


def _import_study(module_name: str):
    """Import ``studies.<...>`` from :func:`studies_root` (put first on ``sys.path``); None if absent."""
    root = studies_root()
    if root is None:
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(module_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkkv",
        description="ChunkKV KV-cache compression for Hugging Face transformers models.",
        epilog="chunkkv COMMAND --help describes a command.",
    )
    parser.add_argument("--version", action="version", version=f"chunkkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "--version":
        parser.parse_args(argv[:1])  # prints the version and exits
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"chunkkv: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    try:
        if module_name.startswith("studies."):
            module = _import_study(module_name)
            if module is None:
                print(f"chunkkv {name}: error: the {name} is a study that runs from a source checkout of chunkkv "
                      f"(studies/ next to src/); this installation has none: clone the repository and run it there",
                      file=sys.stderr)
                return 2
        else:
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("chunkkv"):
            print(f"chunkkv {name}: not available in this version", file=sys.stderr)
            return 2
        raise
    sub = argparse.ArgumentParser(prog=f"chunkkv {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ChunkKVError, FileNotFoundError) as exc:
        print(f"chunkkv {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # resumable runs have said what they finished (INCOMPLETE ...)
        print(f"chunkkv {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
