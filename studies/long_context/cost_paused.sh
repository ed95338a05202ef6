#!/usr/bin/env bash
# Run `python -m studies.long_context cost ARGS...` with every other study job on this machine paused
# (kill -STOP on each `python -m studies.*` process found at the start), resumed on any exit (trap).
# Prints what it paused and what else was running, so the report can say so.
set -u
cd "$(dirname "$0")/../.."
paused=$(pgrep -f "python -m studies\." | tr '\n' ' ')
resume() { [ -n "$paused" ] && kill -CONT $paused 2>/dev/null; echo "cost_paused: resumed: ${paused:-none}" >&2; }
trap resume EXIT INT TERM
echo "cost_paused: pausing: ${paused:-none}" >&2
ps -o pid,args -p "${paused// /,}0" 2>/dev/null | cut -c1-160 >&2
[ -n "$paused" ] && kill -STOP $paused
echo "cost_paused: still running (not paused): $(ps -eo pid,stat,args | awk '$2 ~ /R/ && /python/' | cut -c1-120 | tr '\n' ';')" >&2
COST_OTHERS_PAUSED=1 "${PYTHON:-python}" -m studies.long_context cost "$@"
