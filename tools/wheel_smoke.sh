#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a clean virtual environment and run the
# documented commands from a folder outside the repository.
#
#   bash tools/wheel_smoke.sh [PYTHON]      # PYTHON: the project venv's (default .venv/bin/python)
#
# Nothing but setuptools (when the venv's is older than pyproject's build-system asks) is downloaded:
# the wheel is built with the project venv's setuptools (--no-build-isolation) and installed with --no-deps; the clean venv sees the project venv's site-packages (torch,
# transformers, the eval extras) through a .pth line, which adds the folder to sys.path without
# running its .pth files, so the project's editable install stays out and `import chunkkv` is the wheel's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "== building the wheel"
# pyproject's build-system: setuptools >= 77 (SPDX license, license-files); a fresh venv has an older one.
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null \
    || "$PY" -m pip install -q --disable-pip-version-check "setuptools>=77"
rm -rf build  # setuptools' staging folder: a file left there by an earlier build would ship in the wheel
"$PY" -m pip wheel . --no-deps --no-build-isolation -q -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/chunkkv-*.whl)
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["chunkkv/py.typed", "chunkkv/testbed/chunkkv-testbed/config.json",
        "chunkkv/testbed/chunkkv-testbed/model.safetensors", "chunkkv/testbed/chunkkv-testbed/tokenizer.json"]
missing = [n for n in need if n not in names] + ([] if any(n.endswith("licenses/LICENSE") for n in names) else ["LICENSE"])
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {len(names)} files; " + ("missing " + ", ".join(missing) if missing else "LICENSE, py.typed and the testbed are in it"))
sys.exit(1 if missing else 0)
PYEOF
echo "== a clean venv with the wheel"
"$PY" -m venv "$WORK/venv"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
NEW_SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SITE" > "$NEW_SITE/project-deps.pth"
"$WORK/venv/bin/python" -m pip install -q --no-deps --no-index "$WHEEL"
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
VENV="$WORK/venv/bin"
set -x
"$VENV/python" -c 'import chunkkv, sys; assert chunkkv.__file__.startswith(sys.prefix), chunkkv.__file__; print(chunkkv.__file__)'
"$VENV/chunkkv" --version
"$VENV/python" -m chunkkv --help > /dev/null
"$VENV/chunkkv" demo --model testbed --length 512 --color never
"$VENV/chunkkv" eval --model testbed --task niah --lengths 256 --depths 50 --limit 1 --max-new-tokens 4 --no-progress --out runs/niah
test -f runs/niah/metrics.json
set +x
echo "== wheel smoke passed"
