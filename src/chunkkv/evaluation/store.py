"""Append-only result files: nothing finished is lost, nothing is counted twice.

Layout of an output folder::

    run.json                          settings of the run (a resume must use the same ones)
    predictions.jsonl                 one JSON record per finished sample (single process, or merged)
    predictions.rank{r}-of-{w}.jsonl  a process's own records in a sharded run (merged, then removed)
    metrics.json, summary.md          written when every sample is done (or by --merge)

Each record is written as one line, flushed and fsync'ed before the next sample starts. A record
counts only once its line ends with a newline: readers ignore an unterminated last line (a run
killed mid-write), so its sample is redone, never counted as done; they skip other lines that do
not parse and keep the first record of each id. A writer first cuts its own file back to the last
complete line, so a new record never lands behind a partial one. Only one run writes a folder at a
time (``chunkkv.outputs.OutputLock``), so a merge never replaces a file another run appends to.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["RecordStore", "read_jsonl", "write_json_atomic"]

MAIN = "predictions.jsonl"
_SHARD = re.compile(r"^predictions\.rank(\d+)-of-(\d+)\.jsonl$")


def read_jsonl(path: Path, key: str | None = "id") -> list[dict[str, Any]]:
    """Records of an append-only JSONL file (every resumable run's store). Only lines that end with
    a newline count: a last line without one is an interrupted write (even when it parses, its
    writer may have died before finishing it), so its sample is not done and is redone by a resumed
    run. Other lines that are not a JSON object (holding ``key``, unless None) are skipped with a
    warning."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").split("\n")
    # split() leaves the piece after the last newline at the end: "" for a complete file.
    for n, line in enumerate(lines[:-1]):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or (key is not None and key not in obj):
            warnings.warn(f"{path}:{n + 1}: skipping a line that is not a JSON record", stacklevel=2)
            continue
        out.append(obj)
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RecordStore:
    """The records of one output folder, seen from one process.

    Args:
        out_dir: the output folder (created).
        rank, world: this process's shard; ``world == 1`` writes ``predictions.jsonl`` directly.
    """

    def __init__(self, out_dir: str | Path, rank: int = 0, world: int = 1) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = rank, world
        name = MAIN if world == 1 else f"predictions.rank{rank}-of-{world}.jsonl"
        self.path = self.dir / name
        self._file = None

    # -- reading -------------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """The main file and every shard file present (of any world size)."""
        shards = sorted(p for p in self.dir.glob("predictions.rank*-of-*.jsonl") if _SHARD.match(p.name))
        return [self.dir / MAIN, *shards]

    def load(self) -> dict[str, dict[str, Any]]:
        """Every finished record by id (first one wins), over all files."""
        records: dict[str, dict[str, Any]] = {}
        for path in self.files():
            for rec in read_jsonl(path):
                records.setdefault(str(rec["id"]), rec)
        return records

    # -- writing -------------------------------------------------------------------------------
    def _open(self):
        if self._file is None:
            if self.path.exists():
                _cut_partial_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably (write, flush, fsync)."""
        f = self._open()
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def merge(self, order: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rewrite ``predictions.jsonl`` with every record once (in ``order`` if given, then by the
        records' ``index``), then remove the shard files. Returns the merged records."""
        self.close()
        records = self.load()
        if order is not None:
            rank = {rid: i for i, rid in enumerate(order)}
            ordered = sorted(records.values(), key=lambda r: (rank.get(str(r["id"]), len(rank)), r.get("index", 0)))
        else:
            ordered = sorted(records.values(), key=lambda r: (r.get("index", 0), str(r["id"])))
        write_text_atomic(self.dir / MAIN, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
        for path in self.files()[1:]:
            path.unlink(missing_ok=True)
        return ordered

    def reset(self) -> None:
        """Delete every record file and result (``--overwrite``)."""
        self.close()
        for path in self.files():
            path.unlink(missing_ok=True)
        for name in ("metrics.json", "summary.md", "run.json"):
            (self.dir / name).unlink(missing_ok=True)


def _cut_partial_line(path: Path) -> None:
    """Truncate a file after its last newline (drops an unfinished last record)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline.
        pos = size - 1
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)
