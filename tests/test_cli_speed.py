"""The command line answers without importing torch or transformers when it has no model work to do:
``--help``, every ``COMMAND --help``, ``--version`` and usage errors (each run in a fresh process).
How long that takes is measured by ``tools/cli_speed.py``, not here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import chunkkv

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "generate", "eval", "bench", "inspect", "sweep")
RUNNER = """
import sys
from chunkkv.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
print("@@heavy=" + ",".join(heavy), file=sys.stderr)
sys.exit(code if isinstance(code, int) else 0)
"""


def _run(argv: list[str], cwd: Path) -> tuple[int, str, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    lines = proc.stderr.strip().splitlines()
    heavy = lines[-1].removeprefix("@@heavy=") if lines and lines[-1].startswith("@@heavy=") else "?"
    return proc.returncode, proc.stdout, "\n".join(lines[:-1]), heavy


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *[[c, "--help"] for c in COMMANDS]],
                         ids=lambda a: " ".join(a))
def test_help_imports_neither_torch_nor_transformers(argv, tmp_path):
    code, out, err, heavy = _run(argv, tmp_path)
    assert code == 0, err
    assert heavy == "", f"chunkkv {' '.join(argv)} imported {heavy}"
    assert (f"chunkkv {chunkkv.__version__}" in out) if argv == ["--version"] else "usage: chunkkv" in out


def test_usage_errors_are_refused_before_torch_is_imported(tmp_path):
    text = tmp_path / "context.txt"
    text.write_text("A short context.\n")
    ctx = ["--context-file", str(text)]
    out = str(tmp_path / "out")
    cases = [
        (["generate", *ctx, "--method", "chunkyy"], "unknown method 'chunkyy'"),
        (["generate", *ctx, "--keep-fraction", "1.5"], "keep_fraction=1.5 is out of range"),
        (["generate", *ctx, "--compress-every", "8"], "--compress-every needs --decode-budget"),
        (["generate", *ctx, "--reuse-depth", "x"], "--reuse-depth 'x'"),
        (["generate", "--load-context", "x.ckv", "--keep-fraction", "0.2"], "--keep-fraction would be ignored"),
        (["eval", "--model", "testbed", "--task", "nosuch", "--out", out], "unknown task 'nosuch'"),
        (["eval", "--model", "testbed", "--task", "niah", "--methods", "full,snapq", "--out", out], "unknown method 'snapq'"),
        (["demo", "--keep-fraction", "2"], "keep_fraction=2.0 is out of range"),
        (["inspect", *ctx, "--methods", "chunkkv,snapq"], "unknown method 'snapq'"),
        (["bench", "--methods", "full,nope", "--out", out], "unknown method 'nope'"),
        (["bench", "--repeats", "0"], "--repeats 0 must be >= 1"),
        (["generate", *ctx, "--chunk-size", "0"], "--chunk-size 0 must be an integer >= 1"),
        (["eval", "--model", "testbed", "--task", "niah", "--kernel", "0", "--out", out], "--kernel 0 must be an integer >= 1"),
        (["demo", "--window", "-1"], "--window -1 must be an integer >= 0"),
    ]
    for argv, message in cases:
        code, _, err, heavy = _run(argv, tmp_path)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
        assert heavy == "", f"chunkkv {' '.join(argv)} imported {heavy} before refusing"


def test_python_dash_m_chunkkv(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-m", "chunkkv", "--version"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"chunkkv {chunkkv.__version__}"


def test_the_light_name_tables_are_the_librarys():
    from chunkkv import names
    from chunkkv.methods import METHODS
    from chunkkv.scorers import SCORINGS

    assert names.METHOD_NAMES == tuple(METHODS)
    assert names.SCORING_NAMES == tuple(SCORINGS)
    for alias, name in names.METHOD_ALIASES.items():
        assert chunkkv.make_method(alias, **({} if name == "full" else {"keep_fraction": 0.1})).name == name
