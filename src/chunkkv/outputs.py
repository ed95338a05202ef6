"""Output places of the long-running commands: checked before any work, held by one run at a time,
and the one rule every resumable result file follows.

* :func:`check_output_dir` / :func:`check_output_file` say, before a model is loaded, when an
  ``--out`` / ``--html`` / ``--report`` / ``--save-context`` / cache folder cannot be created or
  written (a file where a folder is needed, a path under a file, a read-only place), instead of a
  traceback after the work.
* :class:`OutputLock` keeps two runs from writing one output folder at once (they would lose
  each other's records when one merges or rewrites a file the other still appends to). It is an
  ``fcntl.flock`` on a lock file in the folder, held for the whole run: the kernel drops it when
  the process ends, however it ends (``kill -9`` included), so a crashed run never leaves the
  folder stuck. A second run is refused at once with the holder's pid and command line.

* :class:`ResumableStore` is the rule for every folder of results that a rerun of the same command
  completes (``chunkkv eval`` tasks incl. ``--task ppl`` / ``--task recall``, ``chunkkv bench
  --prefill-memory``, the studies): the folder held by one run (:class:`OutputLock`, taken before
  the model loads); the run's settings compared with those the folder was written with before
  anything is appended (other settings are refused, naming them, unless ``overwrite``); a torn
  last line (a run killed mid-write) cut before the first append and never counted; records
  appended one line at a time, flushed and fsync'ed; and a run that ends before its plan is done
  says ``INCOMPLETE … run the same command again`` (:func:`incomplete_line`) and exits non-zero.
  ``chunkkv.evaluation.store.RecordStore`` (sharded eval runs) is built from the same pieces
  (:func:`read_jsonl`, :func:`cut_partial_line`, :func:`check_settings`).

Sharded ``chunkkv eval`` runs share the folder: each rank holds the folder lock *shared* and its
own rank lock exclusively; rank 0 waits for the exclusive folder lock before it merges.
Locks are per process and reentrant (the CLI takes it before loading the model, the library call
inside takes it again). ``flock`` needs a local file system; on platforms without ``fcntl`` no lock
is taken.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import ChunkKVError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None

__all__ = [
    "LOCK_NAME", "OutputBusyError", "OutputLock", "ResumableStore", "SettingsMismatchError", "check_output_dir",
    "check_output_file", "check_settings", "cut_partial_line", "incomplete_line", "make_shareable", "read_jsonl",
    "write_json_atomic", "write_text_atomic",
]

LOCK_NAME = ".chunkkv-lock"


class OutputBusyError(ChunkKVError):
    """Another run is writing the same output folder."""


# --- writability --------------------------------------------------------------------------------
def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _probe(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder`` (the only test that also holds for root and read-only mounts)."""
    probe = folder / f".chunkkv-write-test-{os.getpid()}"
    try:
        with open(probe, "w"):
            pass
        probe.unlink()
    except OSError as exc:
        raise ChunkKVError(f"{what}: cannot write in {folder} ({exc.strerror or exc})") from None


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` if needed and check a file can be written in it.

    Raises :class:`ChunkKVError` naming ``flag`` when ``path`` is a file, lies under a file, or is
    in a place that cannot be written.
    """
    if not str(path).strip():
        raise ChunkKVError(f"{flag} is empty: give a folder")
    path = Path(path)
    what = f"{flag} {path}"
    if path.exists() and not path.is_dir():
        raise ChunkKVError(f"{what} is a file; give a folder (it is created if missing)")
    base = _first_existing(path.parent if not path.exists() else path)
    if not base.is_dir():
        raise ChunkKVError(f"{what}: {base} is a file, so no folder can be created under it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ChunkKVError(f"{what}: cannot create the folder ({exc.strerror or exc})") from None
    _probe(path, what)
    return path


def check_output_file(path: str | Path, flag: str, create_parent: bool = True) -> Path:
    """Check the file ``path`` can be (re)written: not a folder, its folder exists (or is created
    with ``create_parent``) and is writable, and an existing file is writable."""
    if not str(path).strip():
        raise ChunkKVError(f"{flag} is empty: give a file name")
    path = Path(path)
    what = f"{flag} {path}"
    if path.is_dir():
        raise ChunkKVError(f"{what} is a folder; give a file name")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ChunkKVError(f"{what}: {parent} is a file, not a folder")
    if not parent.exists():
        base = _first_existing(parent)
        if not base.is_dir():
            raise ChunkKVError(f"{what}: {base} is a file, so no folder can be created under it")
        if not create_parent:
            raise ChunkKVError(f"{what}: folder {parent} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ChunkKVError(f"{what}: cannot create the folder {parent} ({exc.strerror or exc})") from None
    _probe(parent, what)
    if path.exists():
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise ChunkKVError(f"{what}: cannot write the file ({exc.strerror or exc})") from None
    return path


# --- the lock -----------------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # lock file -> [file object, holders in this process]


def _write_holder(f) -> None:
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            + " ".join(sys.argv)[:300] + "\n")
    f.flush()


def _holder_text(lock_path: Path) -> str:
    try:
        lines = lock_path.read_text(encoding="utf-8").strip().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    text = lines[-1].strip() if lines else ""  # the holder writes its own line last
    return f" ({text})" if text else ""


class OutputLock:
    """An exclusive (or shared) lock on an output folder, held until :meth:`release` or process exit.

    Args:
        folder: the output folder (created).
        name: the lock file's name inside it (``.chunkkv-lock``; sharded ranks add their own).
        shared: take a shared lock (ranks of one sharded run), else exclusive.
        what: how the refusal names the folder, e.g. ``"--out runs/x"``.
    """

    def __init__(self, folder: str | Path, *, name: str = LOCK_NAME, shared: bool = False, what: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.shared = shared
        self.what = what or str(self.folder)
        self._key = str(self.path.resolve())
        self._held = False

    def acquire(self) -> OutputLock:
        """Take the lock without waiting; raise :class:`OutputBusyError` when another run holds it."""
        if self._held:
            return self
        entry = _HELD.get(self._key)
        if entry is not None:  # this process holds it already (CLI, then the library call)
            entry[1] += 1
            self._held = True
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise ChunkKVError(f"{self.what}: cannot write the lock file {self.path} ({exc.strerror or exc})") from None
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise OutputBusyError(
                    f"{self.what} is in use by another run{_holder_text(self.path)}; wait for it to finish, "
                    "or give another output folder (two runs in one folder would lose each other's results)"
                ) from None
        _write_holder(f)  # shared holders: the last one to start is named
        _HELD[self._key] = [f, 1]
        self._held = True
        return self

    def upgrade(self, log_every: float = 60.0, poll: float = 0.2) -> None:
        """Turn a held shared lock into an exclusive one, waiting for the other holders to leave
        (rank 0 of a sharded run, before it merges the other ranks' files)."""
        entry = _HELD.get(self._key)
        if not self.shared or entry is None or fcntl is None:
            return
        f = entry[0]
        last = time.monotonic()
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - last > log_every:
                    print(f"chunkkv: waiting for the other processes writing {self.folder} to finish", file=sys.stderr)
                    last = time.monotonic()
                time.sleep(poll)
        self.shared = False
        _write_holder(f)

    def release(self) -> None:
        """Drop this holder; the lock itself goes when the last holder in this process drops it."""
        if not self._held:
            return
        self._held = False
        entry = _HELD.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            entry[0].close()  # closing the descriptor drops the flock

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --- files written whole ----------------------------------------------------------------------------
def make_shareable(path: str | Path) -> None:
    """Give a file written through a private temporary file the permissions an ordinary new file
    gets (``0666`` less the umask), e.g. ``0644``: a saved context or a cached model is meant to be
    read by others where the folder allows it."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o666 & ~umask)
    except OSError:
        pass


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --- append-only JSONL ----------------------------------------------------------------------------
def read_jsonl(path: str | Path, key: str | None = "id") -> list[dict[str, Any]]:
    """Records of an append-only JSONL file (every resumable run's store). Only lines that end with
    a newline count: a last line without one is an interrupted write (even when it parses, its
    writer may have died before finishing it), so its record is not done and is redone by a resumed
    run. Other lines that are not a JSON object (holding ``key``, unless None) are skipped with a
    warning."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
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


def cut_partial_line(path: str | Path) -> bool:
    """Truncate a file after its last newline (drops an unfinished last record, so the next record
    never lands behind it). Returns True when something was cut."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
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
                return True
            pos = start
        f.truncate(0)
        return True


# --- the run's settings -----------------------------------------------------------------------------
class SettingsMismatchError(ChunkKVError):
    """An output folder holds results of a run with other settings."""


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["length: 2048 in the folder, 1024 now", ...]`` for every setting that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before = "unset" if key not in old else _short(old[key])
            after = "unset" if key not in new else _short(new[key])
            out.append(f"{key}: {before} in the folder, {after} now")
    return out


def check_settings(folder: str | Path, settings: dict[str, Any], *, name: str = "run.json",
                   expected: int | None = None, flag: str = "--out",
                   legacy: dict[str, Any] | None = None, restart: str = "--overwrite to start over",
                   extra: dict[str, Any] | None = None) -> None:
    """Refuse to add results to ``folder`` when the run that wrote it had other settings; record ours.

    ``settings`` (JSON-ready) are compared with ``folder/name`` (``{"config": ..., "expected": ...}``);
    a difference raises :class:`SettingsMismatchError` naming each differing setting. ``legacy``:
    for a folder written before settings were recorded, the settings its records carry (only the
    keys given are compared). ``restart``: how the message says to start over. Writes
    ``folder/name`` with ``settings`` (and ``expected``, and the ``extra`` entries) atomically.
    """
    folder = Path(folder)
    path = folder / name
    settings = json.loads(json.dumps(settings, default=str))
    old = None
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            old = saved.get("config") if isinstance(saved, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            old = None
        if not isinstance(old, dict):
            raise SettingsMismatchError(
                f"{flag} {folder}: {path.name} (the settings of the run that wrote the folder) is damaged, so its "
                f"results cannot be told apart from another run's; use another {flag}, or {restart}")
    elif legacy:
        legacy = json.loads(json.dumps(legacy, default=str))
        if any(settings.get(k) != v for k, v in legacy.items()):
            old = {**settings, **legacy}  # the difference shows the settings the records carry
    if old is not None and old != settings:
        refuse_other_settings(folder, old, settings, flag, restart)
    write_json_atomic(path, {"config": settings, "expected": expected, **(extra or {})})


def refuse_other_settings(folder: str | Path, old: dict[str, Any], new: dict[str, Any], flag: str = "--out",
                          restart: str = "--overwrite to start over") -> None:
    """Raise the :class:`SettingsMismatchError` that names how ``new`` differs from ``old``."""
    raise SettingsMismatchError(
        f"{flag} {folder} holds results of a run with other settings ({'; '.join(settings_diff(old, new))}); its "
        f"results would be mixed with this run's: use another {flag}, or {restart}"
    )


def incomplete_line(done: int, expected: int, unit: str, where: str | Path, extra: str = "") -> str:
    """The one line an unfinished resumable run ends with (on stdout; the command exits non-zero)."""
    return (f"INCOMPLETE: {done} of {expected} {unit} have a result in {where}; run the same command again"
            f"{extra} to finish the missing ones; finished {unit} are kept")


# --- the one rule ---------------------------------------------------------------------------------
class ResumableStore:
    """One append-only JSONL file of results in an output folder, completed by rerunning the command.

    Args:
        folder: the output folder (created); ``records``: the JSONL file's name in it.
        settings: what every record depends on (JSON-ready): a rerun with other settings is
            refused (:class:`SettingsMismatchError`, naming them) before anything is appended.
            Settings that only widen the plan (more texts, another budget) belong to the plan, not here.
        key: a field every record holds (lines without it are skipped with a warning).
        ident: ``record -> hashable``: which planned item a record is (a rerun skips those done;
            the first record of an item wins).
        flag: how messages name the folder (``--out``).
        overwrite: delete the folder's earlier records, settings and ``outputs`` first.
        outputs: names of files derived from the records (reports), deleted by ``overwrite``.
        legacy: ``record -> settings or None``: settings a record written before settings were
            recorded carries (compared on the keys given).
        unit: what a record is, for the INCOMPLETE line; ``restart``: how a refusal says to start over.

    Use as a context manager (or :meth:`open` / :meth:`close`): it holds the folder's
    :class:`OutputLock` (reentrant: a CLI can take it before loading the model), checks the
    settings, and on the way out of an exception prints :func:`incomplete_line` when a ``plan``
    was given to :meth:`plan` and is not done.
    """

    def __init__(self, folder: str | Path, records: str, settings: dict[str, Any], *, key: str | None = None,
                 ident: Callable[[dict[str, Any]], Any] | None = None, flag: str = "--out", overwrite: bool = False,
                 outputs: Iterable[str] = (), legacy: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
                 unit: str = "rows", restart: str = "--overwrite to start over") -> None:
        self.folder = Path(folder)
        self.path = self.folder / records
        self.settings_path = self.folder / (Path(records).stem + ".run.json")
        self.settings = settings
        self.key, self.ident, self.flag, self.overwrite = key, ident, flag, overwrite
        self.outputs = tuple(outputs)
        self.legacy, self.unit, self.restart = legacy, unit, restart
        self._lock: OutputLock | None = None
        self._file = None
        self._planned: list | None = None
        self._depth = 0

    # -- holding the folder ----------------------------------------------------------------------
    def open(self) -> ResumableStore:
        """Check the folder can be written, take its lock, delete old results (``overwrite``) and
        compare the settings; reentrant."""
        self._depth += 1
        if self._depth > 1:
            return self
        try:
            check_output_dir(self.folder, self.flag)
            self._lock = OutputLock(self.folder, what=f"{self.flag} {self.folder}").acquire()
            if self.overwrite:
                for name in (self.path.name, self.settings_path.name, *self.outputs):
                    target = self.folder / name
                    if target.is_dir():
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        target.unlink(missing_ok=True)
            legacy = None
            if not self.settings_path.exists() and self.legacy is not None:
                legacy = next((found for found in map(self.legacy, self.load()) if found), None)
            check_settings(self.folder, self.settings, name=self.settings_path.name, flag=self.flag, legacy=legacy,
                           restart=self.restart)
        except BaseException:
            self._depth = 1
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close the file and release the lock (when the outermost holder closes)."""
        if self._depth > 1:
            self._depth -= 1
            return
        self._depth = 0
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ResumableStore:
        return self.open()

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is not None and self._depth == 1:
                self.say_incomplete(file=sys.stdout)
        finally:
            self.close()

    # -- records ---------------------------------------------------------------------------------
    def load(self) -> list[dict[str, Any]]:
        """The finished records (complete lines; the first of each item when ``ident`` is given)."""
        records = read_jsonl(self.path, key=self.key)
        if self.ident is None:
            return records
        seen, out = set(), []
        for record in records:
            try:
                item = self.ident(record)
            except (KeyError, TypeError):
                continue
            if item not in seen:
                seen.add(item)
                out.append(record)
        return out

    def done(self) -> set:
        """The items (``ident``) that have a record."""
        return {self.ident(r) for r in self.load()} if self.ident is not None else set()

    def plan(self, items: Iterable) -> list:
        """Say what this run must finish (for :meth:`say_incomplete`); returns the items not done yet."""
        self._planned = list(items)
        done = self.done()
        return [item for item in self._planned if item not in done]

    def append(self, *records: dict[str, Any]) -> None:
        """Append records durably (one line each; write, flush, fsync). The first append cuts a torn
        last line left by a killed run."""
        if self._file is None:
            if self.path.exists():
                cut_partial_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    # -- the end of a run ------------------------------------------------------------------------
    def missing(self) -> int:
        """Planned items without a record (0 when no plan was given)."""
        if self._planned is None:
            return 0
        done = self.done()
        return sum(1 for item in self._planned if item not in done)

    def incomplete(self) -> str | None:
        """The INCOMPLETE line when planned items have no record, else None."""
        if self._planned is None:
            return None
        missing = self.missing()
        if not missing:
            return None
        total = len(self._planned)
        return incomplete_line(total - missing, total, self.unit, self.path)

    def say_incomplete(self, file=None) -> bool:
        """Print the INCOMPLETE line (stdout) when the plan is not done; True when printed."""
        line = self.incomplete()
        if line is None:
            return False
        print(line, file=file or sys.stdout, flush=True)
        return True
