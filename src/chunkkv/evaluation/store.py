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
The pieces (reading, cutting a torn line, the settings check) are :mod:`chunkkv.outputs`'s, shared
with every other resumable store (:class:`chunkkv.outputs.ResumableStore`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..outputs import cut_partial_line, read_jsonl, write_json_atomic, write_text_atomic

__all__ = ["RecordStore", "read_jsonl", "write_json_atomic", "write_text_atomic"]

MAIN = "predictions.jsonl"
_SHARD = re.compile(r"^predictions\.rank(\d+)-of-(\d+)\.jsonl$")


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
                cut_partial_line(self.path)
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
