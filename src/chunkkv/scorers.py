"""Where token scores come from: one small object per scoring, composed rather than named in branches.

A scorer says what it needs from the run and turns it into one layer's token scores. What it may
need, cheapest first:

* **nothing beyond the prefill's own queries** (:class:`WindowScorer`: the last ``window`` queries;
  :class:`AccumulatedScorer`: every query, H2O's score). These are ``inline``: they are computed
  right after each layer's attention during the prefill, so the layer can be pruned at once;
* **the prefill's final hidden states** (:class:`SurprisalScorer`: each token's negative
  log-likelihood), known only after the whole prefill;
* **a scoring pass** (:class:`ReconstructionScorer`, :class:`ProbeScorer`): extra tokens fed after the
  context on a copy of its full cache, described by a :class:`ScoringPass`; they never stay in the
  cache.

Scorers do no model work: the pipeline (:mod:`chunkkv.capture`, :mod:`chunkkv.scoring_pass`) runs
the prefill and the passes the scorers ask for and hands the results over as :class:`Evidence`.

Shapes: every scorer returns ``[B, Hkv, T]`` float32 scores in padded coordinates (as the prompt is
laid out, left padding first). A scorer whose scores serve every layer and head alike (``shared``)
returns its one row expanded over the heads (a view), so per-head methods see equal heads.

:class:`Combined` adds scorers, each over its row maximum; ``"hybrid"`` is surprisal + shallow
reconstruction (``"hybrid_chunked"``, its copy part at :data:`CHUNKED_COPY_WEIGHT`, is how a chunked
prefill runs it). :data:`SCORERS` maps the names every API takes (``scoring="hybrid"``) to scorers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch

from .errors import ChunkKVError
from .scoring import Workspace, accumulated_attention_scores, window_attention_scores

#: The instruction a reconstruction pass feeds before repeating the context (KVzip's prompt).
REPEAT = "Repeat the previous context exactly."
#: The question-like instruction of the probe pass.
PROBE = "List every specific fact, name, number and secret stated in the document above."
#: Shallow reconstruction runs and scores the first quarter of the compressed layers (rounded up).
SHALLOW_DEPTH = 0.25
#: ... and gives each row's first 4 real tokens its largest score (the prompt's head).
SHALLOW_SINK = 4
#: What the copy part of ``"hybrid"`` counts in a chunked prefill (``"hybrid_chunked"``). A chunk's
#: pass repeats only that chunk, so the copy heads find almost every token and the part loses its
#: contrast (Gemma 3 at 32k: a fact 1.43x its chunk's mean one-shot, 1.07x in chunks), while
#: surprisal is the same both ways; at full weight the flattened copy part outvotes surprisal as the
#: chunks multiply. Chosen on recorded chunk scores of Gemma 3 documents (studies/long_context).
CHUNKED_COPY_WEIGHT = 0.3


@dataclass(frozen=True)
class ScoringPass:
    """Extra tokens run after the context to score it (their queries score the context's keys).

    Attributes:
        instruction: text fed first, after a separator (as a question would be).
        repeat: then feed the context itself again, teacher-forced (reconstruction).
        depth: run and score only the first ``depth`` share of the compressed layers (rounded up);
            the forward stops after the last of them. None: every layer a method asks for.
        reduce: ``"max"`` (the largest attention a token receives) or ``"sum"``.
        last_only: with ``depth``, score only the last of those layers (the others run the model's own
            attention, which is cheaper than computing the scores).
    """

    instruction: str
    repeat: bool
    depth: float | None
    reduce: str
    last_only: bool = False

    def layers(self, compressed: list[int], asked: list[int]) -> list[int]:
        """The layers this pass scores: the first ``depth`` share of ``compressed``, else ``asked``."""
        if self.depth is None:
            return list(asked)
        first = list(compressed[: max(1, math.ceil(len(compressed) * self.depth))]) if compressed else []
        return first[-1:] if self.last_only else first


@dataclass
class Evidence:
    """What the run produced for the scorers of one prompt.

    Attributes:
        surprisal: ``[B, T]`` each token's negative log-likelihood (padding 0), or None.
        passes: ``{pass: {layer: [B, Hkv, T]}}`` raw scores of each scoring pass run so far.
        memo: rows derived from them, shared by every layer (filled by the scorers).
    """

    surprisal: torch.Tensor | None = None
    passes: dict[ScoringPass, dict[int, torch.Tensor]] = field(default_factory=dict)
    memo: dict[Any, torch.Tensor] = field(default_factory=dict)


@dataclass
class LayerInputs:
    """What a scorer and a method see for one layer.

    Attributes:
        queries: ``[B, Hq, q, d]`` query states of the last ``q`` prompt positions (post RoPE /
            q-norm; every position for H2O at prefill).
        keys: ``[B, Hkv, T, d]`` key states of the whole prompt (or of the slots a layer holds).
        scaling: softmax scale used by the model; ``softcap``: logit soft-cap or None.
        key_valid: ``[B, T]`` bool, False at left padding / filler slots (None = none).
        lengths: ``[B]`` real tokens per row; ``pad``: ``[B]`` left padding per row.
        kept: ``[B]`` tokens this layer keeps per row; ``slots``: ``max(kept)`` (host int).
        layer: the model layer index.
        memo: per-layer scores already computed, shared by several methods of one prefill
            (``{("window", w): ...}``, ``{("accumulated",): ...}``); None computes them.
        evidence: the prompt's :class:`Evidence` (None when only inline scorers run).
        input_ids: ``[B, T]`` the prompt's token ids (boundary-aware ChunkKV), None when the
            held slots are not the prompt.
        keep_recent: most recent slots always kept (None: the method's window).
        positions: ``[B, T]`` each held slot's row-relative prompt position, when the slots are not
            simply the prompt (a re-selection over kept tokens + a chunk); None: slot ``t`` is token ``t``.
        workspace: scratch buffers shared by the layers of one compression
            (:class:`chunkkv.scoring.Workspace`); None allocates per call.
    """

    queries: torch.Tensor | None
    keys: torch.Tensor
    scaling: float
    softcap: float | None
    key_valid: torch.Tensor | None
    lengths: torch.Tensor
    pad: torch.Tensor
    kept: torch.Tensor
    slots: int
    layer: int = 0
    memo: dict | None = None
    evidence: Evidence | None = None
    input_ids: torch.Tensor | None = None
    keep_recent: int | None = None
    positions: torch.Tensor | None = None
    workspace: Workspace | None = None

    def cached(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, or the memo's value under ``key`` (stored there on first use)."""
        if self.memo is None:
            return compute()
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def window_scores(self, window: int) -> torch.Tensor:
        """Raw window attention scores ``[B, Hkv, T]`` of the last ``min(window, q)`` queries."""
        win = min(window, self.queries.shape[2])
        return self.cached(("window", win), lambda: window_attention_scores(
            self.queries[:, :, -win:], self.keys, self.scaling, self.key_valid, self.softcap, self.workspace))

    def need_evidence(self, what: str) -> Evidence:
        if self.evidence is None:
            raise ChunkKVError(
                f"{what} is computed after the whole prefill (chunkkv.compress and chunkkv.capture_prefill run it); "
                "this selection was called without it")
        return self.evidence


class Scorer:
    """Base of every scorer (see the module docstring). Subclasses are frozen dataclasses."""

    #: True when the scores are known right after each layer's attention during the prefill.
    inline: ClassVar[bool] = False
    #: True when the scores need every prompt query, not just the window.
    needs_all_queries: ClassVar[bool] = False
    #: True when the scores need the prefill's final hidden states (each token's surprisal).
    needs_surprisal: ClassVar[bool] = False
    #: True when one row of scores serves every layer and head.
    shared: ClassVar[bool] = False

    def passes(self) -> tuple[ScoringPass, ...]:
        """The scoring passes this scorer reads."""
        return ()

    def scores(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        """``[B, Hkv, T]`` float32 scores of one layer (padded coordinates)."""
        raise NotImplementedError

    def _pass_scores(self, inputs: LayerInputs) -> tuple[Evidence, dict[int, torch.Tensor]]:
        """The evidence and the per-layer scores of this scorer's own ``scoring_pass``."""
        evidence = inputs.need_evidence(f"scoring={self.name!r}")
        per_layer = evidence.passes.get(self.scoring_pass)  # type: ignore[attr-defined]
        if per_layer is None:
            raise ChunkKVError(f"scoring={self.name!r}: its scoring pass has not run for this prompt")
        return evidence, per_layer

    @property
    def name(self) -> str:
        """The registry name of this scorer, or a description of it."""
        for key, scorer in SCORERS.items():
            if scorer == self:
                return key
        return repr(self)

    def to_json(self) -> dict[str, Any]:
        """A JSON form :func:`scorer_from_json` reads back (saved contexts, run settings)."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [[s.to_json(), w] for s, w in value] if f.name == "parts" else value
        return out


def _expand(row: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
    """A ``[B, T]`` row as ``[B, Hkv, T]`` (a view: every head sees the same scores)."""
    return row[:, None, :].expand(-1, inputs.keys.shape[1], -1)


@dataclass(frozen=True)
class WindowScorer(Scorer):
    """Attention from the prompt's last ``window`` queries (SnapKV / ChunkKV; query-aware when the
    question ends the prompt)."""

    inline: ClassVar[bool] = True

    def scores(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        return inputs.window_scores(window)


@dataclass(frozen=True)
class AccumulatedScorer(Scorer):
    """Attention each token receives from every prompt query (H2O's heavy hitters)."""

    inline: ClassVar[bool] = True
    needs_all_queries: ClassVar[bool] = True

    def scores(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        return inputs.cached(("accumulated",), lambda: accumulated_attention_scores(
            inputs.queries, inputs.keys, inputs.scaling, inputs.key_valid, inputs.softcap))


@dataclass(frozen=True)
class SurprisalScorer(Scorer):
    """Each token's negative log-likelihood given what precedes it (Selective Context's
    self-information): no extra tokens, one output projection over the prompt, the same scores for
    every layer and head."""

    needs_surprisal: ClassVar[bool] = True
    shared: ClassVar[bool] = True

    def scores(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        evidence = inputs.need_evidence("scoring='surprisal'")
        if evidence.surprisal is None:
            raise ChunkKVError("surprisal scores need a capture made with capture_prefill(..., surprisal=True)")
        return _expand(evidence.surprisal, inputs)


@dataclass(frozen=True)
class ReconstructionScorer(Scorer):
    """The largest attention each token receives while the model repeats the context (KVzip's signal).

    Attributes:
        depth: None scores every layer with its own pass scores; a share (0.25: shallow
            reconstruction) runs the pass through the first layers only and gives every layer and
            head one row, the max over those layers' heads.
        sink: the row's first ``sink`` real tokens score the row's maximum (the copy queries ignore
            the prompt's head, and a cache without it loses a chat template's opening).
        instruction: fed before the repeated context.
        last_only: with ``depth``, the scores of the last of those layers only.
    """

    depth: float | None = None
    sink: int = 0
    instruction: str = REPEAT
    last_only: bool = False

    def __post_init__(self) -> None:
        if self.depth is not None and not 0 < self.depth <= 1:
            raise ChunkKVError(f"depth={self.depth} must be in (0, 1] (the share of the layers scored) or None")
        if self.sink < 0:
            raise ChunkKVError(f"sink={self.sink} must be >= 0")
        if self.last_only and self.depth is None:
            raise ChunkKVError("last_only needs a depth (the share of the layers the pass runs through)")

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return self.depth is not None

    @property
    def scoring_pass(self) -> ScoringPass:
        return ScoringPass(self.instruction, repeat=True, depth=self.depth, reduce="max", last_only=self.last_only)

    def passes(self) -> tuple[ScoringPass, ...]:
        return (self.scoring_pass,)

    def scores(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        evidence, per_layer = self._pass_scores(inputs)
        if self.depth is None:
            return per_layer[inputs.layer]
        if self not in evidence.memo:
            evidence.memo[self] = self._shared_row(per_layer, inputs)
        return _expand(evidence.memo[self], inputs)

    def _shared_row(self, per_layer: dict[int, torch.Tensor], inputs: LayerInputs) -> torch.Tensor:
        row = torch.stack([per_layer[i] for i in sorted(per_layer)]).amax(dim=(0, 2))  # [B, T]
        if self.sink:
            width = row.shape[-1]
            offset = torch.arange(width, device=row.device)[None, :] - (width - inputs.lengths)[:, None]
            head = (offset >= 0) & (offset < self.sink)
            row = torch.where(head, row.amax(dim=-1, keepdim=True), row)
        return row


@dataclass(frozen=True)
class ProbeScorer(Scorer):
    """Attention from a generic question-like instruction, summed over its queries (a window-style
    score with a better window)."""

    instruction: str = PROBE

    @property
    def scoring_pass(self) -> ScoringPass:
        return ScoringPass(self.instruction, repeat=False, depth=None, reduce="sum")

    def passes(self) -> tuple[ScoringPass, ...]:
        return (self.scoring_pass,)

    def scores(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        return self._pass_scores(inputs)[1][inputs.layer]


@dataclass(frozen=True)
class Combined(Scorer):
    """A weighted sum of scorers, each over its row maximum (negative scores count 0), so parts
    measured in different units count alike: ``Combined(((a, 1.0), (b, 1.0)))``."""

    parts: tuple[tuple[Scorer, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.parts:
            raise ChunkKVError("Combined needs at least one (scorer, weight) part")
        for part in self.parts:
            if not (isinstance(part, tuple) and len(part) == 2 and isinstance(part[0], Scorer)
                    and isinstance(part[1], (int, float)) and part[1] >= 0):
                raise ChunkKVError(f"Combined parts are (scorer, weight >= 0) pairs, got {part!r}")

    @property
    def inline(self) -> bool:  # type: ignore[override]
        return all(s.inline for s, _ in self.parts)

    @property
    def needs_all_queries(self) -> bool:  # type: ignore[override]
        return any(s.needs_all_queries for s, _ in self.parts)

    @property
    def needs_surprisal(self) -> bool:  # type: ignore[override]
        return any(s.needs_surprisal for s, _ in self.parts)

    @property
    def shared(self) -> bool:  # type: ignore[override]
        return all(s.shared for s, _ in self.parts)

    def passes(self) -> tuple[ScoringPass, ...]:
        return tuple(dict.fromkeys(p for s, _ in self.parts for p in s.passes()))

    def scores(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        if self.shared and inputs.evidence is not None:  # one row for every layer: computed once
            key = (self, inputs.keys.shape[1])
            if key not in inputs.evidence.memo:
                inputs.evidence.memo[key] = self._sum(inputs, window)
            return inputs.evidence.memo[key]
        return self._sum(inputs, window)

    def _sum(self, inputs: LayerInputs, window: int) -> torch.Tensor:
        total = None
        for scorer, weight in self.parts:
            part = scorer.scores(inputs, window).clamp(min=0)
            part = part / part.amax(-1, keepdim=True).clamp(min=1e-12)
            if weight != 1.0:
                part = part * weight
            total = part if total is None else total + part
        return total


#: The scorings every API takes by name (``scoring="hybrid"``). ``"window"`` means the method's own
#: attention scoring: the observation window for SnapKV/PyramidKV/ChunkKV, every query for H2O.
_SHALLOW = ReconstructionScorer(depth=SHALLOW_DEPTH, sink=SHALLOW_SINK)
SCORERS: dict[str, Scorer] = {
    "window": WindowScorer(),
    "reconstruction": ReconstructionScorer(),
    "shallow_reconstruction": _SHALLOW,
    "probe": ProbeScorer(),
    "surprisal": SurprisalScorer(),
    "hybrid": Combined(((_SHALLOW, 1.0), (SurprisalScorer(), 1.0))),
    # what "hybrid" runs as in a chunked prefill (chunkkv.chunk_scoring.in_chunks)
    "hybrid_chunked": Combined(((_SHALLOW, CHUNKED_COPY_WEIGHT), (SurprisalScorer(), 1.0))),
}
SCORINGS = tuple(SCORERS)
_TYPES = {cls.__name__: cls for cls in (WindowScorer, AccumulatedScorer, SurprisalScorer, ReconstructionScorer,
                                        ProbeScorer, Combined)}


def resolve_scorer(scoring: str | Scorer) -> Scorer:
    """The scorer a name (or a scorer) stands for; a clear error for unknown names."""
    if isinstance(scoring, Scorer):
        return scoring
    if isinstance(scoring, str) and scoring in SCORERS:
        return SCORERS[scoring]
    raise ChunkKVError(f"scoring={scoring!r} is not one of {', '.join(SCORINGS)} (or a chunkkv.scorers.Scorer)")


def scorer_from_json(data: Any) -> Scorer:
    """Read back :meth:`Scorer.to_json` (or a registry name)."""
    if isinstance(data, str):
        return resolve_scorer(data)
    if not isinstance(data, dict) or data.get("type") not in _TYPES:
        raise ChunkKVError(f"not a saved scorer: {data!r}")
    cls = _TYPES[data["type"]]
    kwargs = {k: v for k, v in data.items() if k != "type"}
    if cls is Combined:
        kwargs["parts"] = tuple((scorer_from_json(s), float(w)) for s, w in kwargs.get("parts", ()))
    return cls(**kwargs)
