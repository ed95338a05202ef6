"""kvpress 0.5.5 side by side: same weights, same prompts, its own pinned environment.

kvpress pins transformers < 5.3, so it cannot share our process. The model is saved with
``save_pretrained`` to a temporary folder (or the ``--model`` folder is used as is), and
``tools/kvpress_reference.py --timing-only --timing-repeats R --decode-steps N`` runs in the
kvpress environment (``tools/kvpress_env.sh``, default ``.venv-kvpress``) on the same token ids.
It times kvpress's ``press.compress`` per layer inside its own prefill hook (the counterpart of
chunkkv's ``measure=True``) and greedy decoding after compression the way its pipeline does.

Peers: ``ChunkKVPress(SnapKVPress(compression_ratio=1-budget), chunk_length=20)`` and
``SnapKVPress(compression_ratio=1-budget)`` with kvpress's defaults (window 64, kernel 5).
Ratios are chunkkv / kvpress (below 1 = chunkkv faster). With ``peer_rounds`` > 1 kvpress runs that
many times, each round after our compared configurations are timed again, and every figure is the
median over the rounds (:func:`merge_rounds`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .measure import allocator_state

ROOT = Path(__file__).resolve().parents[3]
TOOL = ROOT / "tools" / "kvpress_reference.py"
WINDOW = 64  # kvpress SnapKVPress default window; kvpress asserts the prompt is longer

# (our configuration, kvpress press, what is compared)
PAIRS = [
    ("chunkkv", "chunkkv", "chunkkv defaults (window 32, max-pool 7, chunk 10) vs ChunkKVPress"),
    ("chunkkv_reuse2", "chunkkv", "chunkkv with reuse depth 2 vs ChunkKVPress"),
    ("chunkkv-kvpress", "chunkkv", "chunkkv's kvpress preset (same tokens as ChunkKVPress) vs ChunkKVPress"),
    ("snapkv", "snapkv", "chunkkv's SnapKV (window 32, max-pool 7) vs SnapKVPress"),
    ("snapkv-kvpress", "snapkv", "chunkkv's SnapKV kvpress preset vs SnapKVPress"),
]


def find_kvpress_python(explicit: str | None = None) -> Path | None:
    """``explicit``, else ``$KVPRESS_PYTHON``, else ``.venv-kvpress/bin/python`` in the repo or cwd."""
    if explicit:
        return Path(explicit) if Path(explicit).exists() else None
    candidates = [os.environ.get("KVPRESS_PYTHON"), ROOT / ".venv-kvpress" / "bin" / "python",
                  Path.cwd() / ".venv-kvpress" / "bin" / "python"]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    return None


def _model_folder(bench, tmp: Path) -> Path:
    import chunkkv

    if bench.model_dir is not None:
        folder = Path(bench.model_dir)
        if folder.is_dir() and (list(folder.glob("*.safetensors")) or list(folder.glob("*.safetensors.index.json"))):
            return folder
    folder = tmp / "model"
    chunkkv.detach(bench.model)  # save the stock attention setting, not chunkkv's wrapper
    try:
        bench.model.save_pretrained(folder)
    finally:
        chunkkv.attach(bench.model)
    return folder


def run_peers(bench, log: Callable[[str], None]) -> dict[str, Any]:
    """Run kvpress on the bench's model and prompts; never raises (errors are reported)."""
    cfg = bench.cfg
    python = find_kvpress_python(cfg.kvpress_python)
    if python is None:
        where = cfg.kvpress_python or "$KVPRESS_PYTHON or .venv-kvpress"
        msg = (f"kvpress environment not found ({where}; build it with tools/kvpress_env.sh or pass "
               "--kvpress-python); peers skipped")
        log(msg)
        return {"status": "missing", "reason": msg}
    if not TOOL.exists():
        msg = f"{TOOL} not found (chunkkv installed outside its repository); peers skipped"
        log(msg)
        return {"status": "missing", "reason": msg}
    contexts, names = compared(cfg)
    if not contexts:
        return {"status": "skipped", "reason": f"no context longer than kvpress's window ({WINDOW})"}
    ratio = round(1.0 - cfg.budget, 10)
    cases = []
    for c in contexts:
        ids = bench.prompts.get(c, 1).cpu().tolist()
        for press in ("chunkkv", "snapkv"):
            cases.append({"name": f"{press}-{c}", "press": press, "compression_ratio": ratio, "input_ids": ids})
    info = bench.info
    rounds: list[list[dict[str, Any]]] = []
    first: dict[str, Any] = {}  # the first round's output: versions and raw cases
    with tempfile.TemporaryDirectory(prefix="chunkkv-bench-peers-") as tmp_name:
        tmp = Path(tmp_name)
        folder = _model_folder(bench, tmp)
        (tmp / "cases.json").write_text(json.dumps(cases))
        cmd = [
            str(python), str(TOOL), "--model", str(folder), "--cases", str(tmp / "cases.json"),
            "--out", str(tmp / "out.json"), "--timing-only", "--timing-repeats", str(cfg.repeats),
            "--decode-steps", str(cfg.decode_steps), "--decode-warmup", str(max(1, cfg.decode_warmup)),
            "--threads", str(torch.get_num_threads()), "--device", str(bench.device),
            "--dtype", info["dtype"], "--keep-going",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # never leak our transformers into the pinned env
        for k in range(cfg.peer_rounds):
            if k:  # ours again, right before this round's kvpress process: the two sides alternate
                ours = {(name, c): row for c in contexts for name, row in bench.peer_round(c, names).items()}
            else:
                ours = {(r["config"], r["context"]): r for r in bench.result["prefill"]}
            log(f"kvpress{f' round {k + 1} of {cfg.peer_rounds}' if cfg.peer_rounds > 1 else ''}: "
                + " ".join(cmd[:2]) + " ...")
            (tmp / "out.json").unlink(missing_ok=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0 or not (tmp / "out.json").exists():
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
                log("kvpress run failed:\n" + "\n".join(tail))
                return {"status": "error", "returncode": proc.returncode, "stderr_tail": tail, "command": cmd,
                        "round": k + 1}
            out = json.loads((tmp / "out.json").read_text())
            if not k:
                first = out
            rounds.append(_compare(ours, _theirs(out, cases), contexts))
    result: dict[str, Any] = {
        "status": "ok",
        "kvpress_version": first.get("kvpress_version"),
        "transformers_version": first.get("transformers_version"),
        "torch_version": first.get("torch_version"),
        "device": first.get("device"),
        "dtype": first.get("dtype"),
        "num_threads": first.get("num_threads"),
        "allocator": allocator_state(fresh_process=True),  # its own process, started with our environment
        "rounds": cfg.peer_rounds,
        "cases": [],
        "comparison": merge_rounds(rounds),
    }
    for case in first["cases"]:  # the first round's raw cases (kept tokens, decode lengths)
        slim = {k: v for k, v in case.items() if k not in ("kept",)}
        slim["context"] = _context_of(case, cases)
        result["cases"].append(slim)
    return result


def compared(cfg) -> tuple[list[int], set[str]]:
    """The contexts kvpress runs at, and our configurations compared with it (``full`` included)."""
    contexts = [c for c in (cfg.peer_contexts or cfg.contexts) if c > WINDOW]
    return contexts, {"full"} | {ours for ours, _press, _what in PAIRS}


def _theirs(out: dict[str, Any], cases: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """kvpress's cases that ran, keyed by (press, context)."""
    theirs = {}
    for case in out["cases"]:
        if "error" not in case:
            theirs[(case["press"], _context_of(case, cases))] = case
    return theirs


def _context_of(case: dict[str, Any], cases: list[dict[str, Any]]) -> int:
    """The prompt length of one of kvpress's cases (by its name in the cases we sent)."""
    return len(next(x for x in cases if x["name"] == case["name"])["input_ids"][0])


def _compare(ours: dict[tuple[str, int], dict[str, Any]], theirs: dict[tuple[str, int], dict[str, Any]],
             contexts: list[int]) -> list[dict[str, Any]]:
    """One round's comparison rows: each pair of :data:`PAIRS`, then the full cache against no press."""
    rows = []
    for c in contexts:
        for our_name, press, what in PAIRS:
            mine, other = ours.get((our_name, c)), theirs.get((press, c))
            if mine is None or other is None:
                continue
            t = other["timing"]
            row = {
                "context": c, "ours": our_name, "theirs": "ChunkKVPress" if press == "chunkkv" else "SnapKVPress",
                "what": what,
                "compress_ms_ours": mine["compress_ms"]["median"],
                "compress_ms_theirs": round(t["compress_ms_total"], 4),
                "compress_ratio": round(mine["compress_ms"]["median"] / t["compress_ms_total"], 4),
                "compress_speedup": round(t["compress_ms_total"] / mine["compress_ms"]["median"], 3),
                "prefill_ms_ours": round(mine["prefill_s"]["median"] * 1e3, 3),
                "prefill_ms_theirs": round(t["prefill_ms_with_press"], 3),
                "prefill_ratio": round(mine["prefill_s"]["median"] * 1e3 / t["prefill_ms_with_press"], 4),
                "kept_ours": max(mine["kept_per_layer"]) if mine["kept_per_layer"] else None,
                "kept_theirs": max(other["kept_len_per_layer"]),
            }
            _add_decode(row, mine, other.get("decode"))
            rows.append(row)
        full, any_case = ours.get(("full", c)), theirs.get(("chunkkv", c)) or theirs.get(("snapkv", c))
        if full is not None and any_case is not None:
            row = {
                "context": c, "ours": "full", "theirs": "no press", "what": "full cache: prefill and decode",
                "prefill_ms_ours": round(full["prefill_s"]["median"] * 1e3, 3),
                "prefill_ms_theirs": round(any_case["timing"]["prefill_ms_no_press"], 3),
                "prefill_ratio": round(full["prefill_s"]["median"] * 1e3 / any_case["timing"]["prefill_ms_no_press"], 4),
            }
            _add_decode(row, full, any_case.get("decode_no_press"))
            rows.append(row)
    return rows


#: The timed fields of a comparison row: with several rounds each becomes the median over the
#: rounds (ratios: the median of the rounds' own ratios), and ``<field>_rounds`` lists them.
TIMED = ("compress_ms_ours", "compress_ms_theirs", "compress_ratio", "compress_speedup", "prefill_ms_ours",
         "prefill_ms_theirs", "prefill_ratio", "decode_ms_ours", "decode_ms_theirs", "decode_ratio")


def merge_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The comparison rows of alternated rounds as one row per pair (see :data:`TIMED`); one round is
    returned as it is. A pair missing from some round is merged over the rounds that have it."""
    if len(rounds) == 1:
        return rounds[0]
    merged: dict[tuple, dict[str, Any]] = {}
    for rows in rounds:
        for row in rows:
            key = (row["context"], row["ours"], row["theirs"])
            into = merged.setdefault(key, dict(row))
            for f in TIMED:
                if f in row:
                    into.setdefault(f"{f}_rounds", []).append(row[f])
    for row in merged.values():
        for f in TIMED:
            if f"{f}_rounds" in row:
                row[f] = round(statistics.median(row[f"{f}_rounds"]), 4)
        row["rounds"] = max(len(v) for k, v in row.items() if k.endswith("_rounds"))
    return list(merged.values())


def _add_decode(row: dict, ours: dict, theirs: dict | None) -> None:
    """Put decode ms/token of both sides and their ratio into a comparison row, when both exist."""
    if theirs is None or "decode" not in ours:
        return
    row["decode_ms_ours"] = ours["decode"]["ms_per_token"]["median"]
    row["decode_ms_theirs"] = round(theirs["ms_per_token"], 4)
    row["decode_ratio"] = round(row["decode_ms_ours"] / theirs["ms_per_token"], 4)
