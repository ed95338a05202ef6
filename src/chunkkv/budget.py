"""How many prompt tokens each layer keeps.

Three spellings of one budget, named so they cannot be confused:

* ``keep_tokens``     – absolute number of prompt tokens kept per layer (the paper's "KV size 128").
* ``keep_fraction``   – fraction of each prompt's tokens that is **kept** (the paper's "10 %").
* ``remove_fraction`` – fraction that is **removed**; this is kvpress's ``compression_ratio``.

For a prompt of ``n`` real tokens the kept count is

* ``keep_tokens=k``      -> ``min(k, n)``
* ``keep_fraction=f``    -> ``min(n, max(1, floor(f * n)))``
* ``remove_fraction=r``  -> ``min(n, max(1, floor((1 - r) * n)))``

and it is exact: every compressed layer stores that many tokens of the row (PyramidKV: the per-layer
counts average to it). The observation window is counted inside the budget, never on top of it.
Everything here is host-side integer arithmetic done once per request, before the forward pass.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import BudgetError

#: The budget every command uses when none is given: keep 10 % of the prompt (the paper's setting).
DEFAULT_KEEP_FRACTION = 0.1


@dataclass(frozen=True)
class Budget:
    """A compression budget. Set exactly one field (``Budget.full()`` keeps everything)."""

    keep_tokens: int | None = None
    keep_fraction: float | None = None
    remove_fraction: float | None = None

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("keep_tokens", "keep_fraction", "remove_fraction")
            if getattr(self, name) is not None
        ]
        if len(given) > 1:
            raise BudgetError(
                f"budget given twice ({' and '.join(given)}); set exactly one of keep_tokens, "
                "keep_fraction (share kept) or remove_fraction (share removed, kvpress's compression_ratio)"
            )
        for name in ("keep_fraction", "remove_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise BudgetError(f"{name} must be a number, got {value!r}")
            if value is not None and not isinstance(value, float):
                object.__setattr__(self, name, float(value))  # numpy floats, ints: a plain float
        if self.keep_tokens is not None:
            if isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, numbers.Integral):
                raise BudgetError(f"keep_tokens must be an int (a whole number of tokens), got {self.keep_tokens!r}")
            object.__setattr__(self, "keep_tokens", int(self.keep_tokens))  # numpy.int64 -> int
            if self.keep_tokens < 1:
                raise BudgetError(
                    f"keep_tokens={self.keep_tokens} keeps nothing; use a positive number of tokens per layer"
                )
        if self.keep_fraction is not None and not 0.0 < float(self.keep_fraction) <= 1.0:
            raise BudgetError(
                f"keep_fraction={self.keep_fraction} is out of range: it is the share of prompt tokens KEPT, "
                "in (0, 1] (0.1 keeps 10 %). For kvpress's compression_ratio use remove_fraction"
            )
        if self.remove_fraction is not None and not 0.0 <= float(self.remove_fraction) < 1.0:
            raise BudgetError(
                f"remove_fraction={self.remove_fraction} is out of range: it is the share of prompt tokens "
                "REMOVED (kvpress's compression_ratio), in [0, 1) (0.9 keeps 10 %)"
            )

    @classmethod
    def full(cls) -> Budget:
        """A budget that keeps every token."""
        return cls(keep_fraction=1.0)

    @property
    def is_full(self) -> bool:
        """True when this budget can never drop a token."""
        return (
            (self.keep_fraction is not None and float(self.keep_fraction) >= 1.0)
            or (self.remove_fraction is not None and float(self.remove_fraction) == 0.0)
            or (self.keep_tokens is None and self.keep_fraction is None and self.remove_fraction is None)
        )

    def kept(self, n_tokens: int) -> int:
        """Exact number of tokens kept from a prompt of ``n_tokens`` real tokens."""
        if n_tokens <= 0:
            return 0
        if self.keep_tokens is not None:
            return min(self.keep_tokens, n_tokens)
        if self.keep_fraction is not None:
            share = float(self.keep_fraction)
        elif self.remove_fraction is not None:
            share = 1.0 - float(self.remove_fraction)
        else:
            return n_tokens
        return min(n_tokens, max(1, math.floor(share * n_tokens)))

    def describe(self) -> str:
        """Short human-readable form, e.g. ``'10% kept'`` or ``'128 tokens'``."""
        if self.keep_tokens is not None:
            return f"{self.keep_tokens} tokens"
        if self.keep_fraction is not None:
            return f"{100 * float(self.keep_fraction):g}% kept"
        if self.remove_fraction is not None:
            return f"{100 * (1 - float(self.remove_fraction)):g}% kept"
        return "full"


def pyramid_budgets(mean_kept: int, window: int, n_tokens: int, num_layers: int, beta: float = 20.0) -> list[int]:
    """PyramidKV per-layer kept counts for one prompt: linear in depth, averaging exactly ``mean_kept``.

    The window (``min(window, mean_kept)`` tokens) is kept on every layer; the rest of the budget,
    ``m = mean_kept - window``, is spread linearly from ``2m - m/beta`` at layer 0 down to ``m/beta``
    at the last layer (PyramidKV's schedule), capped so no layer asks for more than the prompt has.
    Integer counts are rounded by largest remainder so their sum is exactly ``num_layers * mean_kept``.
    """
    if num_layers < 1:
        raise BudgetError("pyramid budgets need at least one layer")
    if beta < 1:
        raise BudgetError(f"pyramid beta={beta} must be >= 1 (PyramidKV uses 20)")
    kept_window = min(window, mean_kept)
    m = mean_kept - kept_window
    room = n_tokens - kept_window  # the most any one layer can take from the prefix
    if num_layers == 1 or m == 0:
        return [mean_kept] * num_layers
    top = min(2 * m - m / beta, float(room))
    bottom = 2 * m - top
    real = [top - (top - bottom) * layer / (num_layers - 1) for layer in range(num_layers)]
    counts = [math.floor(x) for x in real]
    short = num_layers * m - sum(counts)
    by_remainder = sorted(range(num_layers), key=lambda i: (counts[i] - real[i], i))
    for i in by_remainder[:short]:
        counts[i] += 1
    return [c + kept_window for c in counts]
