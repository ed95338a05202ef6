"""The compression methods: one small frozen dataclass each, all behind one interface.

A method turns one layer's prompt keys and query states into the indices to keep::

    scores  = how much attention each prompt token gets (scoring.py)
    picks   = which tokens / chunks win, per row, inside an exact budget (selection.py)

The glue in ``compress.py`` calls :meth:`Method.select` once per *leader* layer during prefill and
gathers keys and values with the result. Budget fields (exactly one):

* ``keep_tokens``     – prompt tokens kept per layer (absolute),
* ``keep_fraction``   – share of the prompt **kept** (0.1 = keep 10 %),
* ``remove_fraction`` – share **removed**, i.e. kvpress's ``compression_ratio`` (0.9 = keep 10 %).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

import torch

from . import selection as sel
from .budget import Budget, pyramid_budgets
from .errors import BudgetError, ChunkKVError
from .names import canonical_method
from .scorers import SCORERS, SCORINGS, AccumulatedScorer, LayerInputs, Scorer, WindowScorer, resolve_scorer

__all__ = ["METHODS", "SCORINGS", "ChunkKV", "FullKV", "H2O", "KVPressChunkKV", "KVPressSnapKV", "LayerInputs", "Method",
           "PyramidKV", "SnapKV", "StreamingLLM", "make_method"]

POOLINGS = ("none", "avg", "max")
CHUNK_REDUCES = ("mean", "sum", "sqrt_mean")
SEGMENTATIONS = ("fixed", "aligned", "sentence")


@dataclass(frozen=True)
class Method:
    """Common parameters of every method.

    Attributes:
        keep_tokens / keep_fraction / remove_fraction: the budget (set exactly one).
        window: observation window ``w``: the last ``w`` prompt tokens score the rest and are
            always kept (counted inside the budget).
        reuse_depth: layer-wise index reuse; layers form groups of this many and follow the
            first layer of their group. 1 = off, 2 = the paper. Only for methods whose selection
            is shared by all heads of a layer.
        scoring: where the token scores come from: a name of :data:`chunkkv.scorers.SCORERS` or a
            :class:`chunkkv.scorers.Scorer`. ``"window"`` (default): the method's own attention
            scoring (the prompt's last ``window`` queries; every query for H2O), query-aware when
            the question ends the prompt. The question-agnostic scorers run after the prompt's
            prefill on the full cache, and their extra tokens never stay in it:
            ``"reconstruction"`` (KVzip's signal), ``"shallow_reconstruction"``, ``"probe"``,
            ``"surprisal"``, ``"hybrid"`` (surprisal + shallow reconstruction); see
            :mod:`chunkkv.scorers`. The window is kept in every case.
    """

    name: ClassVar[str] = "method"
    shared_across_heads: ClassVar[bool] = False
    # False when ``kept_per_layer`` is only an upper bound, so rows may end with filler slots.
    exact_budget: ClassVar[bool] = True
    # True when ``select`` scores with the queries of the last ``window`` prompt positions.
    uses_window_queries: ClassVar[bool] = False
    # True when the method ranks tokens by scores (so ``scoring`` applies).
    scores_tokens: ClassVar[bool] = False
    # What ``scoring="window"`` means for this method (None: it does not score tokens).
    own_scorer: ClassVar[Scorer | None] = None
    # True when ``select`` reads the token ids of what a layer holds (``LayerInputs.input_ids``); a
    # prefill gathers them only then. True unless a method says otherwise (a method of your own gets them).
    needs_token_ids: ClassVar[bool] = True

    keep_tokens: int | None = None
    keep_fraction: float | None = None
    remove_fraction: float | None = None
    window: int = 32
    reuse_depth: int = 1
    scoring: str | Scorer = "window"

    def __post_init__(self) -> None:
        self.budget  # validates the budget fields
        scorer = resolve_scorer(self.scoring)  # unknown names: a clear error
        named = [name for name, known in SCORERS.items() if known == scorer]
        if named and self.scoring != named[0]:
            object.__setattr__(self, "scoring", named[0])  # a registered scorer is stored by its name
        if self.scoring != "window" and not self.scores_tokens:
            raise ChunkKVError(
                f"{self.name} does not score tokens, so scoring={self.scoring!r} means nothing for it; "
                "use scoring='window' (the default) or a scoring method (chunkkv, snapkv, pyramidkv, h2o)"
            )
        given = Budget(self.keep_tokens, self.keep_fraction, self.remove_fraction)
        for name in ("keep_tokens", "keep_fraction", "remove_fraction"):
            object.__setattr__(self, name, getattr(given, name))  # numpy numbers -> int / float
        for name in ("window", "reuse_depth"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                object.__setattr__(self, name, int(value))
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ChunkKVError(f"window={self.window!r} must be an int >= 0 (tokens of the observation window)")
        if isinstance(self.reuse_depth, bool) or not isinstance(self.reuse_depth, int) or self.reuse_depth < 1:
            raise ChunkKVError(
                f"reuse_depth={self.reuse_depth!r} must be an int >= 1 (1 = no layer-wise reuse, 2 = the paper's setting)"
            )
        if self.reuse_depth > 1 and not self.shared_across_heads:
            raise ChunkKVError(
                f"{self.name} selects tokens per KV head, so its indices cannot be reused across layers; "
                "reuse_depth > 1 needs a method with one index set per layer (chunkkv, streamingllm)"
            )

    # --- budget -----------------------------------------------------------------------------
    @property
    def budget(self) -> Budget:
        """The budget as a :class:`Budget` (raises :class:`BudgetError` when missing or ambiguous)."""
        budget = Budget(self.keep_tokens, self.keep_fraction, self.remove_fraction)
        if self.keep_tokens is None and self.keep_fraction is None and self.remove_fraction is None:
            raise BudgetError(
                f"{self.name} needs a budget: pass keep_tokens=N (tokens per layer), keep_fraction=F "
                "(share kept) or remove_fraction=R (share removed, kvpress's compression_ratio)"
            )
        return budget

    def kept_per_layer(self, lengths: list[int], num_layers: int) -> list[list[int]]:
        """Host-side kept counts, ``[layer][row]``, for rows of ``lengths`` real tokens."""
        per_row = [self.budget.kept(n) for n in lengths]
        return [per_row for _ in range(num_layers)]

    @property
    def scorer(self) -> Scorer | None:
        """The :class:`~chunkkv.scorers.Scorer` this method ranks tokens with (None: it does not score)."""
        if not self.scores_tokens:
            return None
        return self.own_scorer if self.scoring == "window" else resolve_scorer(self.scoring)

    @property
    def needs_all_queries(self) -> bool:
        """True when scoring uses every prompt query (H2O), not just the window."""
        return self.scores_tokens and self.scorer.needs_all_queries

    @property
    def inline(self) -> bool:
        """True when each layer can be pruned right after its own attention during the prefill
        (the scores need nothing from later layers or extra tokens)."""
        return not self.scores_tokens or self.scorer.inline

    def kept_recent(self, inputs: LayerInputs) -> int:
        """Most recent held tokens always kept: the observation window, unless the caller says
        otherwise (a look-ahead re-selection, whose window is not held yet, keeps none by force)."""
        return self.window if inputs.keep_recent is None else inputs.keep_recent

    def raw_scores(self, inputs: LayerInputs) -> torch.Tensor:
        """Raw ``[B, Hkv, T]`` scores of one layer (padded coordinates) from the method's scorer."""
        return self.scorer.scores(inputs, self.window)

    def select(self, inputs: LayerInputs) -> torch.Tensor:
        """Row-relative picks ``[B, 1 or Hkv, slots]`` (``-1`` = filler) for one layer."""
        raise NotImplementedError

    def with_budget(self, **budget: Any) -> Method:
        """Copy with another budget, e.g. ``m.with_budget(keep_fraction=0.25)``."""
        cleared = {"keep_tokens": None, "keep_fraction": None, "remove_fraction": None}
        cleared.update(budget)
        return replace(self, **cleared)

    def settings(self) -> dict[str, Any]:
        """Every field as JSON holds it (token-id sets as sorted lists, an unregistered scorer as its
        :meth:`~chunkkv.scorers.Scorer.to_json`): what saved contexts and run records store."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Scorer):
                value = value.to_json()
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[f.name] = value
        return out

    def describe(self) -> str:
        """One line naming the method and its non-default settings."""
        parts = [self.budget.describe()]
        for f in fields(self):
            if f.name in ("keep_tokens", "keep_fraction", "remove_fraction"):
                continue
            value = getattr(self, f.name)
            if f.name == "digit_ids" and value:
                parts.append("whole numbers")  # the tokenizer's digits: a chunk never cuts a number
            elif value != f.default:
                parts.append(f"{f.name}={len(value)} ids" if isinstance(value, frozenset) else f"{f.name}={value}")
        return f"{self.name}({', '.join(parts)})"


@dataclass(frozen=True)
class _Scored(Method):
    """Methods that score with the observation window and may pool the scores."""

    uses_window_queries: ClassVar[bool] = True
    scores_tokens: ClassVar[bool] = True
    own_scorer: ClassVar[Scorer] = WindowScorer()
    needs_token_ids: ClassVar[bool] = False
    pooling: str = "max"
    kernel: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise ChunkKVError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1:
            raise ChunkKVError(f"kernel={self.kernel!r} must be an int >= 1 (1 = no pooling)")
        if self.window < 1:
            raise ChunkKVError(f"{self.name} scores with the observation window: window must be >= 1, got {self.window}")

    def scores(self, inputs: LayerInputs) -> torch.Tensor:
        """Row-relative pooled prefix scores ``[B, Hkv, T]`` (``-inf`` outside the prefix)."""
        raw = self.raw_scores(inputs)
        aligned = raw if inputs.key_valid is None else sel.align_rows(raw, inputs.pad)
        return sel.prefix_scores(aligned, inputs.lengths, inputs.kept, self.kept_recent(inputs), self.pooling,
                                 self.kernel)


@dataclass(frozen=True)
class FullKV(Method):
    """No compression: the reference every method is compared with."""

    name: ClassVar[str] = "full"
    shared_across_heads: ClassVar[bool] = True

    @property
    def budget(self) -> Budget:
        return Budget.full()

    def describe(self) -> str:
        """``"full"``: it has no budget or settings to show."""
        return "full"

    def select(self, inputs: LayerInputs) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("FullKV keeps every token; there is nothing to select")


@dataclass(frozen=True)
class StreamingLLM(Method):
    """StreamingLLM: ``n_sink`` attention-sink tokens plus the most recent tokens."""

    name: ClassVar[str] = "streamingllm"
    shared_across_heads: ClassVar[bool] = True

    needs_token_ids: ClassVar[bool] = False

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ChunkKVError(f"n_sink={self.n_sink!r} must be an int >= 0")

    def select(self, inputs: LayerInputs) -> torch.Tensor:
        return sel.select_streaming(inputs.lengths, inputs.kept, self.n_sink, inputs.slots)


@dataclass(frozen=True)
class H2O(Method):
    """H2O (prefill form): heavy hitters by attention accumulated over all prompt queries, per KV
    head, plus the recent window."""

    name: ClassVar[str] = "h2o"
    scores_tokens: ClassVar[bool] = True

    own_scorer: ClassVar[Scorer] = AccumulatedScorer()
    needs_token_ids: ClassVar[bool] = False

    def select(self, inputs: LayerInputs) -> torch.Tensor:
        raw = self.raw_scores(inputs)
        aligned = raw if inputs.key_valid is None else sel.align_rows(raw, inputs.pad)
        recent = self.kept_recent(inputs)
        scores = sel.prefix_scores(aligned, inputs.lengths, inputs.kept, recent)
        return sel.select_tokens_per_head(scores, inputs.lengths, inputs.kept, recent, inputs.slots)


@dataclass(frozen=True)
class SnapKV(_Scored):
    """SnapKV: window attention scores, pooled, top tokens per KV head, window kept."""

    name: ClassVar[str] = "snapkv"

    def select(self, inputs: LayerInputs) -> torch.Tensor:
        return sel.select_tokens_per_head(self.scores(inputs), inputs.lengths, inputs.kept, self.kept_recent(inputs),
                                          inputs.slots)


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scores with per-layer budgets falling linearly with depth (mean = budget).

    ``beta`` sets the ratio between the deepest layer's prefix budget and the mean (PyramidKV: 20).
    """

    name: ClassVar[str] = "pyramidkv"

    beta: float = 20.0

    def kept_per_layer(self, lengths: list[int], num_layers: int) -> list[list[int]]:
        per_row = [
            pyramid_budgets(self.budget.kept(n), self.window, n, num_layers, self.beta) for n in lengths
        ]
        return [[row[layer] for row in per_row] for layer in range(num_layers)]


@dataclass(frozen=True)
class ChunkKV(_Scored):
    """ChunkKV: keep whole semantic chunks, one index set for every head of a layer.

    Attributes:
        chunk_size: tokens per chunk (paper: 10); with ``segmentation="sentence"`` the longest chunk.
        chunk_reduce: how a chunk's token scores make its score: ``"mean"`` or ``"sum"`` (equal
            rankings for whole fixed chunks; they differ only for the partial last chunk), or
            ``"sqrt_mean"``, the mean of their square roots (a sentence of many surprising tokens
            outranks one with a single rare word).
        peak_weight: adds this times a chunk's largest token score (after ``chunk_reduce``'s square
            root) to its score, so a long chunk holding one of the text's strongest tokens (a
            name, a number) is not ranked on its average alone. 0 (default) = off.
        reuse_depth: layer-wise index reuse (paper: 2).
        boundary_ids: token ids that end a sentence or clause
            (:func:`chunkkv.boundaries.boundary_token_ids`), for the segmentations below.
        digit_ids: token ids that are digits (:func:`chunkkv.boundaries.digit_token_ids`): a chunk
            never starts inside a run of them, so a number written digit by digit is kept or dropped
            whole (None: off, the paper's chunks).
        segmentation: where chunks start. ``"fixed"``: every ``chunk_size`` tokens (the paper);
            ``"aligned"``: that grid with each edge moved to the nearest boundary within a
            quarter chunk; ``"sentence"``: one chunk per sentence (a new one after every boundary
            token), sentences longer than ``chunk_size`` cut every ``chunk_size`` tokens. None (the
            default): ``"aligned"`` when ``boundary_ids`` is given, else ``"fixed"``.
    """

    name: ClassVar[str] = "chunkkv"
    shared_across_heads: ClassVar[bool] = True

    chunk_size: int = 10
    chunk_reduce: str = "mean"
    boundary_ids: frozenset[int] | None = field(default=None, repr=False)
    segmentation: str | None = None
    peak_weight: float = 0.0
    digit_ids: frozenset[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.peak_weight, bool) or not isinstance(self.peak_weight, (int, float)) or not (
                0.0 <= self.peak_weight < math.inf):
            raise ChunkKVError(f"peak_weight={self.peak_weight!r} must be a number >= 0 (0 = off)")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ChunkKVError(f"chunk_size={self.chunk_size!r} must be a positive int (the paper uses 10)")
        if self.chunk_reduce not in CHUNK_REDUCES:
            raise ChunkKVError(f"chunk_reduce={self.chunk_reduce!r} must be one of {', '.join(CHUNK_REDUCES)}")
        for name, how in (("boundary_ids", "of sentence/clause ends, e.g. chunkkv.boundaries.boundary_token_ids(tokenizer)"),
                          ("digit_ids", "of digits, e.g. chunkkv.boundaries.digit_token_ids(tokenizer)")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                raise ChunkKVError(f"{name} must be token ids (ints >= 0) {how}")
            object.__setattr__(self, name, frozenset(value))
        if self.segmentation is not None and self.segmentation not in SEGMENTATIONS:
            raise ChunkKVError(f"segmentation={self.segmentation!r} must be one of {', '.join(SEGMENTATIONS)}")
        if self.segmentation in ("aligned", "sentence") and not self.boundary_ids:
            raise ChunkKVError(
                f"segmentation={self.segmentation!r} needs the boundary tokens: pass "
                "boundary_ids=chunkkv.boundaries.boundary_token_ids(tokenizer)")

    @property
    def chunking(self) -> str:
        """The segmentation in effect: ``"fixed"``, ``"aligned"`` or ``"sentence"``."""
        if self.segmentation is not None:
            return self.segmentation
        return "aligned" if self.boundary_ids else "fixed"

    @property
    def needs_token_ids(self) -> bool:
        """Chunks cut at sentence ends or kept whole around numbers read the token ids."""
        return self.chunking != "fixed" or bool(self.digit_ids)

    @staticmethod
    def _row_positions(inputs: LayerInputs) -> torch.Tensor:
        """The held slots' prompt positions ``[B, T]``, row-relative like the chunk ids."""
        return inputs.positions if inputs.key_valid is None else sel.align_rows(inputs.positions, inputs.pad)

    def _grid_segments(self, inputs: LayerInputs) -> torch.Tensor:
        """Chunk ids of held slots on the prompt's fixed grid (``position // chunk_size``)."""
        return sel.position_segments(torch.cummax(self._row_positions(inputs), dim=1).values, self.chunk_size)

    def segments(self, inputs: LayerInputs) -> torch.Tensor | None:
        """Row-relative chunk ids ``[B, T]`` for boundary-aware chunks or whole numbers (None: the
        fixed grid, by the fast path)."""
        chunking = self.chunking
        if chunking == "fixed" and not self.digit_ids:
            if inputs.positions is None:
                return None  # the fixed grid over the slots, by the fast path
            return self._grid_segments(inputs)  # held slots of a re-selection: the prompt's chunk grid
        if inputs.input_ids is None:
            raise ChunkKVError(
                f"chunks cut at sentence ends or kept whole around numbers need the token ids of what the layer "
                f"holds (segmentation={chunking!r}, digit_ids {'set' if self.digit_ids else 'unset'}), which this "
                "selection was not given")

        def row_relative(ids: frozenset[int]) -> torch.Tensor:
            found = torch.isin(inputs.input_ids, torch.tensor(sorted(ids), device=inputs.input_ids.device))
            return found if inputs.key_valid is None else sel.align_rows(found, inputs.pad, fill=False)

        def ends() -> torch.Tensor:
            is_end = row_relative(self.boundary_ids)
            if inputs.positions is not None:  # a dropped stretch between two held slots ends a chunk too
                positions = self._row_positions(inputs)
                is_end = is_end.clone()
                is_end[:, :-1] |= positions[:, 1:] != positions[:, :-1] + 1
            return is_end

        def compute() -> torch.Tensor:
            batch, length = inputs.input_ids.shape
            if chunking == "sentence":
                segments = sel.sentence_segments(ends(), self.chunk_size)
            elif chunking == "aligned":
                segments = sel.boundary_segments(ends(), self.chunk_size)
            elif inputs.positions is not None:
                segments = self._grid_segments(inputs)
            else:
                segments = sel.fixed_segments(batch, length, self.chunk_size, inputs.input_ids.device)
            return sel.glue_digits(segments, row_relative(self.digit_ids)) if self.digit_ids else segments

        key = ("segments", chunking, self.chunk_size, hash(self.boundary_ids), hash(self.digit_ids))
        return inputs.cached(key, compute)

    def select(self, inputs: LayerInputs) -> torch.Tensor:
        return sel.select_chunks(
            self.scores(inputs), inputs.lengths, inputs.kept, self.kept_recent(inputs), inputs.slots,
            self.chunk_size, self.chunk_reduce, self.segments(inputs), self.peak_weight,
        )


@dataclass(frozen=True)
class KVPressChunkKV(ChunkKV):
    """kvpress 0.5.5 ``ChunkKVPress(SnapKVPress(...))`` semantics, for side-by-side comparison.

    Differences from :class:`ChunkKV` (all kvpress's choices): the budget is ``remove_fraction``
    (kvpress's ``compression_ratio``); the whole prompt, window included, is cut into chunks and
    ``max(1, int(n_chunks * (1 - ratio)))`` whole chunks are kept, so the kept count is a multiple
    of the chunk size rather than exact; window tokens are scored ``max + 1`` instead of being
    force-kept; SnapKV's average pooling (kernel 5) runs on the prefix only. Each row chooses its
    own chunks (kvpress uses row 0 for the whole batch).
    """

    name: ClassVar[str] = "chunkkv-kvpress"
    exact_budget: ClassVar[bool] = False

    window: int = 64
    pooling: str = "avg"
    kernel: int = 5
    chunk_size: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remove_fraction is None:
            raise BudgetError(
                "the kvpress preset takes its budget as remove_fraction (kvpress's compression_ratio, "
                "the share REMOVED), e.g. remove_fraction=0.9 keeps about 10 %"
            )
        ignored = [name for name, off in (("chunk_reduce", "mean"), ("boundary_ids", None), ("segmentation", None),
                                          ("peak_weight", 0.0), ("digit_ids", None)) if getattr(self, name) != off]
        if ignored:  # kvpress's chunks are fixed and mean-scored: refuse rather than ignore
            raise ChunkKVError(
                f"the kvpress preset reproduces kvpress's fixed, mean-scored chunks; {', '.join(ignored)} "
                "would be ignored: use chunkkv.ChunkKV for these options")

    def kept_chunks(self, n_tokens: int) -> int:
        """Chunks kvpress keeps from ``n_tokens`` tokens."""
        n_chunks = math.ceil(n_tokens / self.chunk_size)
        return max(1, int(n_chunks * (1 - float(self.remove_fraction))))

    def kept_per_layer(self, lengths: list[int], num_layers: int) -> list[list[int]]:
        # Upper bound (the partial last chunk may be chosen); unused slots become fillers.
        per_row = [min(n, self.kept_chunks(n) * self.chunk_size) for n in lengths]
        return [per_row for _ in range(num_layers)]

    def select(self, inputs: LayerInputs) -> torch.Tensor:
        win = min(self.window, inputs.queries.shape[2])
        raw = self.raw_scores(inputs)
        aligned = raw if inputs.key_valid is None else sel.align_rows(raw, inputs.pad)
        length = aligned.shape[-1]
        prefix_len = inputs.lengths - win
        pos = torch.arange(length, device=aligned.device)[None, :]
        in_prefix = (pos < prefix_len[:, None])[:, None, :]
        pooled = sel.pool_scores(aligned.masked_fill(~in_prefix, 0.0), self.pooling, self.kernel)
        pooled = pooled.masked_fill(~in_prefix, 0.0)
        top = pooled.amax(dim=(1, 2), keepdim=True) + 1  # per row; kvpress takes the batch max
        in_window = (pos >= prefix_len[:, None]) & (pos < inputs.lengths[:, None])
        scores = torch.where(in_window[:, None, :], top, pooled)
        scores = scores.masked_fill(~(pos < inputs.lengths[:, None])[:, None, :], sel.NEG_INF)
        kept_chunks = torch.div(inputs.kept + self.chunk_size - 1, self.chunk_size, rounding_mode="floor")
        return sel.select_chunks_kvpress(scores, inputs.lengths, kept_chunks, inputs.slots, self.chunk_size)


@dataclass(frozen=True)
class KVPressSnapKV(SnapKV):
    """kvpress 0.5.5 ``SnapKVPress`` defaults (window 64, average pooling kernel 5)."""

    name: ClassVar[str] = "snapkv-kvpress"

    window: int = 64
    pooling: str = "avg"
    kernel: int = 5


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullKV, StreamingLLM, H2O, SnapKV, PyramidKV, ChunkKV, KVPressChunkKV, KVPressSnapKV)
}


def make_method(name: str, **params: Any) -> Method:
    """Build a method by name, e.g. ``make_method("chunkkv", keep_fraction=0.1, reuse_depth=2)``.

    Parameters that the method does not have are an error, with the list of those it has.
    """
    cls = METHODS[canonical_method(name)]  # unknown names: a clear error
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ChunkKVError(
            f"{cls.name} has no parameter {', '.join(unknown)}; its parameters are {', '.join(sorted(known))}"
        )
    return cls(**params)
