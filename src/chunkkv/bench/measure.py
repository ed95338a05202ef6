"""Timing, memory and cache-size measurement used by the efficiency benchmark.

Timing: ``time.perf_counter`` with ``torch.cuda.synchronize`` around every timed region on GPU.
Summaries (:class:`Stats`) give the median and the spread (min/max and the quartiles).

Peak memory (:class:`MemoryMeter`):

* **CUDA**: ``torch.cuda.reset_peak_memory_stats`` before the region and
  ``torch.cuda.max_memory_allocated`` after it (tensor bytes held by PyTorch's allocator).
* **CPU**: peak resident set size of this process. The kernel's high-water mark ``VmHWM``
  (``/proc/self/status``) is reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``
  before the region and read after it, so it catches every page touched, however short-lived,
  at no cost to the timed code. Before each reset, ``malloc_trim(0)`` hands memory that glibc
  still caches back to the OS, so the baseline is what is really live and the increase is what
  the region needs. Where ``clear_refs`` cannot be written (old kernels, some sandboxes) a
  background thread samples ``VmRSS`` every millisecond instead (it can miss very short peaks;
  the JSON says which one was used). glibc's mmap threshold is fixed at 128 KiB
  (``mallopt(M_MMAP_THRESHOLD)``) when the meter is made: by default glibc raises the threshold
  each time a large block is freed, after which large tensors come from the heap and their freed
  pages stay resident in ways that depend on the order of frees, so the same prefill measured
  twice in fresh processes differed by up to 190 MiB (8k tokens, 100M model: 533 and 685 MiB).
  With the fixed threshold every tensor of 128 KiB or more is its own mapping, returned to the OS
  when freed, and repeated runs agree to 0.1 MiB. The setting cannot be undone and it slows the
  code it runs (every large tensor is fresh pages: a 2k decode step of the 100M model took 58-61
  ms instead of 38-39 on one thread), so **no timing may follow a meter in the same process**: the
  bench times everything first and makes its meter for a last, untimed memory phase.
  :func:`allocator_state` says which setting a process is in, for the record of a timing.

KV bytes are counted from the cache tensors themselves (``numel * element_size`` of every layer's
keys and values), never estimated.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch

MiB = 1024 * 1024


# --- timing -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an already sorted list (numpy's default method)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Stats:
    """Median and spread of repeated measurements (warm-up runs are never included)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float], digits: int = 6) -> Stats:
        if not samples:
            raise ValueError("no samples to summarise")
        s = sorted(samples)
        r = lambda x: round(float(x), digits)  # noqa: E731
        return cls(
            median=r(statistics.median(s)), min=r(s[0]), max=r(s[-1]), q1=r(_quantile(s, 0.25)),
            q3=r(_quantile(s, 0.75)), n=len(s), samples=[r(x) for x in samples],
        )

    def as_dict(self) -> dict:
        return {
            "median": self.median, "min": self.min, "max": self.max, "q1": self.q1, "q3": self.q3,
            "n": self.n, "samples": self.samples,
        }


def stats_dict(samples: list[float], scale: float = 1.0, digits: int = 6) -> dict:
    """:class:`Stats` of ``samples * scale`` as a plain dict (for JSON)."""
    return Stats.of([x * scale for x in samples], digits).as_dict()


# --- memory -----------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024
_FIXED_IN_THIS_PROCESS = False  # set by the first MemoryMeter that fixed the threshold


def _fix_mmap_threshold(libc, threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (no dynamic raising), so freed tensors leave the RSS at once."""
    global _FIXED_IN_THIS_PROCESS
    try:
        fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except AttributeError:  # not glibc
        return False
    _FIXED_IN_THIS_PROCESS = _FIXED_IN_THIS_PROCESS or fixed
    return fixed


def allocator_state(fresh_process: bool = False) -> str:
    """The allocator setting that timings taken now run under, in words (for the record).

    ``"glibc default (dynamic mmap threshold)"`` as users run, unless a :class:`MemoryMeter` fixed
    the threshold earlier in this process or the environment sets glibc's malloc tunables.
    ``fresh_process``: the setting of a child process started now with this environment (kvpress)."""
    tunables = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if "GLIBC_TUNABLES" in os.environ:
        tunables.append("GLIBC_TUNABLES")
    if _FIXED_IN_THIS_PROCESS and not fresh_process:
        return (f"glibc mmap threshold fixed at {MMAP_THRESHOLD // 1024} KiB by an earlier memory measurement in "
                "this process: timings are slower than a user's (run the bench in a fresh process)")
    if tunables:
        return "glibc with " + ", ".join(f"{k}={os.environ[k]}" for k in tunables) + " from the environment"
    return "glibc default (dynamic mmap threshold)"


class _RssSampler:
    """Background thread recording the highest ``VmRSS`` seen (fallback when HWM cannot be reset)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = (_proc_status_kib("VmRSS") or 0) * 1024
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _proc_status_kib("VmRSS")
            if rss is not None:
                self.peak = max(self.peak, rss * 1024)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        rss = _proc_status_kib("VmRSS")
        if rss is not None:
            self.peak = max(self.peak, rss * 1024)
        return self.peak


class MemoryMeter:
    """Current and peak memory of one device; see the module docstring for the method used.

    Usage::

        meter = MemoryMeter(device)
        base = meter.current()      # collects garbage first
        meter.reset_peak()
        ...                         # the region
        peak = meter.peak()         # highest memory since reset_peak()

    On CPU, making a meter fixes glibc's mmap threshold for the rest of the process (see the module
    docstring): time nothing after it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._libc = _libc() if self.device.type == "cpu" else None
        self._sampler: _RssSampler | None = None
        self.fixed_mmap = self._libc is not None and _fix_mmap_threshold(self._libc)
        if self.device.type == "cuda":
            self.method = "cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensor bytes)"
            self._hwm = False
        elif self.device.type == "cpu" and _proc_status_kib("VmRSS") is not None:
            self._hwm = self._try_reset_hwm()
            self.method = (
                "cpu: peak RSS, VmHWM reset through /proc/self/clear_refs, after malloc_trim"
                if self._hwm
                else "cpu: peak RSS sampled every 1 ms from /proc/self/status VmRSS, after malloc_trim"
            ) + (f"; glibc mmap threshold fixed at {MMAP_THRESHOLD // 1024} KiB (a memory phase of its own, "
                 "after every timed run)" if self.fixed_mmap else "")
        else:
            self.method = "unavailable"
            self._hwm = False

    @property
    def available(self) -> bool:
        return self.method != "unavailable"

    @staticmethod
    def _try_reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return False
        return _proc_status_kib("VmHWM") is not None

    def _collect(self) -> None:
        gc.collect()
        if self._libc is not None:
            try:
                self._libc.malloc_trim(0)
            except AttributeError:  # not glibc
                pass

    def current(self) -> int:
        """Bytes in use now (after collecting garbage)."""
        sync(self.device)
        self._collect()
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        rss = _proc_status_kib("VmRSS")
        return 0 if rss is None else rss * 1024

    def reset_peak(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._hwm:
            self._try_reset_hwm()
        elif self.available:
            self._sampler = _RssSampler()
            self._sampler.start()

    def peak(self) -> int:
        """Highest bytes in use since :meth:`reset_peak`."""
        sync(self.device)
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._hwm:
            return (_proc_status_kib("VmHWM") or 0) * 1024
        if self._sampler is not None:
            peak = self._sampler.stop()
            self._sampler = None
            return peak
        return 0


# --- cache sizes ------------------------------------------------------------------------------
def kv_bytes_per_layer(cache) -> list[int]:
    """Bytes of stored keys + values per cache layer, from the tensors (``numel * element_size``)."""
    out = []
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        values = getattr(layer, "values", None)
        if not getattr(layer, "is_initialized", False) or keys is None:
            out.append(0)
            continue
        out.append(keys.numel() * keys.element_size() + values.numel() * values.element_size())
    return out


def expected_kv_bytes(batch: int, kv_heads: int, stored: int, head_dim: int, element_size: int) -> int:
    """Arithmetic size of one layer's cache: ``batch * heads * stored * head_dim * 2 (K and V) * bytes``."""
    return batch * kv_heads * stored * head_dim * 2 * element_size
