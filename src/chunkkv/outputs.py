"""Output places of the long-running commands: checked before any work, held by one run at a time.

* :func:`check_output_dir` / :func:`check_output_file` say, before a model is loaded, when an
  ``--out`` / ``--html`` / ``--report`` cannot be created or written (a file where a folder is
  needed, a path under a file, a read-only place), instead of a traceback after the work.
* :class:`OutputLock` keeps two runs from writing one output folder at once (they would lose
  each other's records when one merges or rewrites a file the other still appends to). It is an
  ``fcntl.flock`` on a lock file in the folder, held for the whole run: the kernel drops it when
  the process ends, however it ends (``kill -9`` included), so a crashed run never leaves the
  folder stuck. A second run is refused at once with the holder's pid and command line.

Sharded ``chunkkv eval`` runs share the folder: each rank holds the folder lock *shared* and its
own rank lock exclusively; rank 0 waits for the exclusive folder lock before it merges.
Locks are per process and reentrant (the CLI takes it before loading the model, the library call
inside takes it again). ``flock`` needs a local file system; on platforms without ``fcntl`` no lock
is taken.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from .errors import ChunkKVError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None

__all__ = ["LOCK_NAME", "OutputBusyError", "OutputLock", "check_output_dir", "check_output_file"]

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
        text = lock_path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
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
