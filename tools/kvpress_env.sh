#!/usr/bin/env bash
# Build (idempotently) the pinned reference environment for tools/kvpress_reference.py.
#
# It holds NVIDIA kvpress 0.5.5 (the official ChunkKV implementation) with the
# transformers version it was validated against, isolated from the main chunkkv venv
# (which uses transformers >= 5.20).
#
#   torch        == 2.13.0   (installed FIRST: on this machine that resolves to the local
#                             CPU wheel; any other torch spec makes pip pull a multi-GB CUDA build)
#   kvpress      == 0.5.5
#   transformers == 5.2.0
#
# Usage:
#   tools/kvpress_env.sh                      # creates ./.venv-kvpress (repo root)
#   KVPRESS_VENV=/some/dir tools/kvpress_env.sh
#   PYTHON=python3.11 tools/kvpress_env.sh    # interpreter used to create the venv
#
# The last line printed on stdout is the path of the venv's python, so callers can do:
#   KVPY="$(tools/kvpress_env.sh | tail -n 1)"
#   "$KVPY" tools/kvpress_reference.py --model DIR --cases cases.json --out ref.json
#
# Model compatibility: models written by `save_pretrained` under transformers 5.24 (main venv)
# load unchanged under 5.2.0 (verified for a random Llama; the state dict round-trips exactly).
# kvpress_reference.py nevertheless verifies every loaded tensor against the safetensors files
# and, if loading ever fails or differs, falls back to building the model from config.json in
# this venv and loading the safetensors state dict strictly.
set -euo pipefail

TORCH_VERSION="2.13.0"
KVPRESS_VERSION="0.5.5"
TRANSFORMERS_VERSION="5.2.0"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KVPRESS_VENV:-${REPO_ROOT}/.venv-kvpress}"
PYTHON="${PYTHON:-python3}"
VPY="${VENV}/bin/python"

log() { echo "[kvpress_env] $*" >&2; }

# Returns 0 iff the venv exists and has exactly the pinned versions.
versions_ok() {
    [[ -x "${VPY}" ]] || return 1
    "${VPY}" - "${TORCH_VERSION}" "${KVPRESS_VERSION}" "${TRANSFORMERS_VERSION}" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
want_torch, want_kvpress, want_tf = sys.argv[1:4]
ok = (
    version("torch").split("+")[0] == want_torch
    and version("kvpress") == want_kvpress
    and version("transformers") == want_tf
)
sys.exit(0 if ok else 1)
EOF
}

if versions_ok; then
    log "up to date: ${VENV} (torch ${TORCH_VERSION}, kvpress ${KVPRESS_VERSION}, transformers ${TRANSFORMERS_VERSION})"
else
    if [[ ! -x "${VPY}" ]]; then
        log "creating venv ${VENV} with $(${PYTHON} --version 2>&1)"
        "${PYTHON}" -m venv "${VENV}"
    fi
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    log "installing torch==${TORCH_VERSION} (first, so the CPU wheel is used)"
    "${VPY}" -m pip install -qq "torch==${TORCH_VERSION}"
    log "installing kvpress==${KVPRESS_VERSION} transformers==${TRANSFORMERS_VERSION}"
    # Re-pinning torch here stops the resolver from replacing the wheel installed above.
    "${VPY}" -m pip install -qq "torch==${TORCH_VERSION}" \
        "kvpress==${KVPRESS_VERSION}" "transformers==${TRANSFORMERS_VERSION}"
    if ! versions_ok; then
        log "ERROR: ${VENV} does not have the pinned versions after install:"
        "${VPY}" -m pip list 2>/dev/null | grep -Ei '^(torch|kvpress|transformers) ' >&2 || true
        exit 1
    fi
    log "done"
fi

echo "${VPY}"
