"""How fast the ``chunkkv`` command answers when it has no real work to do.

Times ``chunkkv --help``, every ``chunkkv COMMAND --help`` and a list of usage errors (bad flags,
unknown names, out-of-range budgets, flag combinations), each in a fresh Python process, and says
whether the process imported torch / transformers. The goal (issue 22): every line under 1 s.

    python tools/cli_speed.py                       # this checkout (src/)
    python tools/cli_speed.py --src /other/checkout/src --label before
    python tools/cli_speed.py --repeats 5 --json timings.json

A benchmark, not a test: timings depend on the machine and its load (tests/test_cli_speed.py only
checks that torch is not imported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI's main() and reports, on the last line of stderr, which heavy modules got imported.
_RUNNER = """
import sys
from chunkkv.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
sys.stderr.write("\\n@@heavy=" + ",".join(heavy) + "\\n")
sys.exit(code if isinstance(code, int) else 0)
"""


def cases(tmp: Path) -> list[tuple[str, list[str]]]:
    text = tmp / "context.txt"
    text.write_text("A short context. It has two sentences.\n", encoding="utf-8")
    out = str(tmp / "out")
    ctx = ["--context-file", str(text)]
    return [
        ("help", ["--help"]),
        *[(f"{c} --help", [c, "--help"]) for c in ("demo", "generate", "eval", "bench", "inspect", "sweep")],
        ("unknown command", ["nosuch"]),
        ("eval: no --out", ["eval", "--task", "niah"]),
        ("eval: unknown task", ["eval", "--model", "testbed", "--task", "nosuch", "--out", out]),
        ("eval: bad --lengths", ["eval", "--model", "testbed", "--task", "niah", "--lengths", "1k", "--out", out]),
        ("eval: unknown method", ["eval", "--model", "testbed", "--task", "niah", "--method", "chunky", "--out", out]),
        ("eval: --methods typo", ["eval", "--model", "testbed", "--task", "niah", "--methods", "full,snapq", "--out", out]),
        ("generate: unknown method", ["generate", *ctx, "--method", "chunkyy"]),
        ("generate: --keep-fraction 1.5", ["generate", *ctx, "--keep-fraction", "1.5"]),
        ("generate: budget given twice", ["generate", *ctx, "--keep-fraction", "0.1", "--keep-tokens", "9"]),
        ("generate: --compress-every alone", ["generate", *ctx, "--compress-every", "8"]),
        ("generate: --keep-tokens abc", ["generate", *ctx, "--keep-tokens", "abc"]),
        ("generate: --load-context + budget", ["generate", "--load-context", str(tmp / "x.ckv"), "--keep-fraction", "0.2"]),
        ("demo: --keep-fraction 2", ["demo", "--keep-fraction", "2"]),
        ("demo: --methods typo", ["demo", "--methods", "full,nope"]),
        ("inspect: --methods typo", ["inspect", *ctx, "--methods", "chunkkv,snapq"]),
        ("bench: --contexts x", ["bench", "--contexts", "x"]),
        ("bench: --methods typo", ["bench", "--methods", "full,nope", "--out", out]),
        ("bench: --repeats 0", ["bench", "--repeats", "0"]),
    ]


def measure(python: str, src: str, argv: list[str], repeats: int, cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times, heavy, code = [], "", None
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([python, "-c", _RUNNER, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        code = proc.returncode
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        heavy = tail[0].removeprefix("@@heavy=") if tail[0].startswith("@@heavy=") else "?"
    return {"seconds": round(statistics.median(times), 3), "exit": code, "heavy": heavy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="interpreter with torch and transformers installed")
    parser.add_argument("--src", default=str(ROOT / "src"), help="the chunkkv source folder to time (default: this checkout)")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--repeats", type=int, default=3, help="runs per line; the median is shown (3)")
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        print(f"chunkkv CLI start-up, {args.label} ({args.src}); median of {args.repeats} runs")
        print(f"{'case':36} {'seconds':>8} {'exit':>5}  imported")
        for name, case in cases(Path(tmp)):
            r = measure(args.python, args.src, case, args.repeats, Path(tmp))
            rows.append({"case": name, "argv": case, **r})
            print(f"{name:36} {r['seconds']:8.2f} {r['exit']!s:>5}  {r['heavy'] or '-'}", flush=True)
    slow = [r for r in rows if r["seconds"] >= 1.0]
    print(f"{len(rows) - len(slow)} of {len(rows)} under 1 s" + (f"; slow: {', '.join(r['case'] for r in slow)}" if slow else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"label": args.label, "src": args.src, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
