"""Question-agnostic scores kept chunk by chunk, for a chunked prefill that never holds the full cache.

The question-agnostic default (surprisal + shallow reconstruction, :mod:`chunkkv.agnostic`) scores
the context after its whole prefill, on the full cache. In chunks (``prefill_chunk=C``) each part
is computed where it can be, and kept **per prompt position** in two ``[B, T]`` float buffers (4
bytes a token, not K/V):

* **surprisal** is causal: each chunk's tokens get their negative log-likelihood from the chunk's
  own final hidden states (the chunk's first token from the previous chunk's last one), given what
  the layers hold — the one-shot value until something is dropped;
* **shallow reconstruction** runs per chunk, on a fork of what the layers hold (kept tokens + the
  chunk): the instruction, then the chunk's tokens repeated, through the first quarter of the
  compressed layers. Each pass's attention is taken over its mean on the chunk's own tokens (a pass's
  level follows what it competes with, not what the tokens are worth), and each held token's copy
  score is the largest it has received in any chunk's pass so far (earlier tokens can still rise
  when a later chunk copies them).

In chunks ``"hybrid"`` runs as ``"hybrid_chunked"`` (:func:`in_chunks`): the copy part counts
:data:`~chunkkv.scorers.CHUNKED_COPY_WEIGHT`, because one chunk's pass has far less contrast than
the one-shot pass over the whole context, while surprisal is the same both ways.

After every chunk (the last included) each layer re-selects over everything it holds with these
scores, normalised over what it holds (Combined's row maximum), so the budget is shared by all the
chunks seen: an early chunk is never evicted only for being early, and what no later chunk
outscores stays (deferred eviction). Scorers other than these two (full-depth reconstruction, the
probe: per-layer scores of the whole context) are refused with a clear error.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from .attention import compression_session
from .cache import ChunkKVCache, PrunedLayer
from .errors import PromptError, UnsupportedModelError
from .scorers import SCORERS, Combined, Evidence, ReconstructionScorer, Scorer, ScoringPass, SurprisalScorer
from .scoring import first_token_surprisal, masked_attention_scores, max_attention_scores
from .scoring_pass import ScoredEnough, scoring_tokens

__all__ = ["RunningScores", "chunkable", "in_chunks", "run_in_chunks"]


def _leaves(scorer: Scorer) -> list[Scorer]:
    if isinstance(scorer, Combined):
        return [leaf for part, _w in scorer.parts for leaf in _leaves(part)]
    return [scorer]


def chunkable(scorer: Scorer) -> bool:
    """True when ``scorer`` can be kept chunk by chunk: surprisal, shallow reconstruction, their mix."""
    return all(isinstance(s, SurprisalScorer) or (isinstance(s, ReconstructionScorer) and s.depth is not None)
               for s in _leaves(scorer))


def in_chunks(scoring: str | Scorer) -> str | Scorer:
    """The scoring a chunked prefill runs for ``scoring``: ``"hybrid"`` becomes ``"hybrid_chunked"``
    (its copy part down-weighted, see the module docstring); anything else stays as given (a
    :class:`~chunkkv.scorers.Combined` of your own weights keeps them)."""
    return "hybrid_chunked" if scoring in ("hybrid", SCORERS["hybrid"]) else scoring


def run_in_chunks(method):
    """``method`` as a chunked prefill longer than one chunk runs it (its scoring through
    :func:`in_chunks`); the same object when nothing changes."""
    scoring = in_chunks(method.scoring)
    return method if scoring == method.scoring else replace(method, scoring=scoring)


#: Copy queries (and surprisal's tokens) scored at a time: their attention weights (vocabulary
#: logits) are materialised, so a block keeps them within one chunk's activations, the memory bound's
#: window-score term, whatever the chunk size.
SCORE_QUERIES = 32


class _CopySession:
    """The attention wrapper's session during one chunk's reconstruction pass: each scored layer's
    copy queries score the slots it held before the pass (under the layer's own mask)."""

    def __init__(self, fork: ChunkKVCache, layers: list[int], held: dict[int, int]) -> None:
        self.fork, self.layers, self.held = fork, set(layers), held
        self.stop_after = max(layers)
        self.query_valid: torch.Tensor | None = None
        self.scores: dict[int, torch.Tensor] = {}

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        idx = module.layer_idx
        if idx not in self.layers or layer is not self.fork.layers[idx]:
            return
        scaling = kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5)
        mask, softcap, held = kwargs.get("attention_mask"), kwargs.get("softcap"), self.held[idx]
        if mask is None:  # no padding, no fillers: plain causal attention
            block = max_attention_scores(query, key, scaling, held, None, self.query_valid, softcap,
                                         block=SCORE_QUERIES)
        else:
            block = masked_attention_scores(query, key, scaling, mask, held, self.query_valid, softcap,
                                            block=SCORE_QUERIES)
        previous = self.scores.get(idx)
        self.scores[idx] = block if previous is None else torch.maximum(previous, block)
        if idx == self.stop_after:
            raise ScoredEnough


class RunningScores:
    """Per-position scores of a shared question-agnostic scorer, updated after each chunk.

    Use: :meth:`hook` around the whole chunked prefill (surprisal comes from each chunk's forward),
    :meth:`after_chunk` once a chunk has gone through every layer, then :meth:`evidence` for each
    layer's re-selection.
    """

    def __init__(self, model: torch.nn.Module, scorer: Scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 instructions: Callable[[str], torch.Tensor] | None, compressed: list[int], block: int = 256) -> None:
        if not chunkable(scorer):
            raise PromptError(
                f"scoring={scorer.name!r} scores the whole context on the full cache, so it cannot run in chunks; "
                "chunked prefill keeps surprisal, shallow_reconstruction and hybrid (the question-agnostic default) "
                "up to date chunk by chunk, or scores with the window (scoring='window')")
        leaves = _leaves(scorer)
        self.model, self.scorer, self.block = model, scorer, block
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.surprisal = any(isinstance(s, SurprisalScorer) for s in leaves)
        self.passes: list[ScoringPass] = list(dict.fromkeys(
            s.scoring_pass for s in leaves if isinstance(s, ReconstructionScorer)))
        if self.passes and instructions is None:
            raise PromptError(
                f"scoring={scorer.name!r} feeds the instruction {self.passes[0].instruction!r} after each chunk: pass "
                "tokenizer=... (or scoring_prompt=<token ids>) so it can be tokenized")
        self.instructions = instructions
        self.scored = {p: p.layers(compressed, []) for p in self.passes}
        batch, width = input_ids.shape
        self.nll = torch.zeros(batch, width, dtype=torch.float32, device=input_ids.device)
        self.copy = {p: torch.zeros(batch, width, dtype=torch.float32, device=input_ids.device) for p in self.passes}
        self._chunk: tuple[int, int] | None = None
        self._last_hidden: torch.Tensor | None = None
        self.seconds = 0.0

    # --- surprisal, from each chunk's own forward ------------------------------------------------
    def hook(self):
        """A context manager: while it is open, each chunk's forward (announced by :meth:`expect`)
        turns its final hidden states into the chunk's surprisal."""
        if not self.surprisal:
            return _Nothing()
        head = self.model.get_output_embeddings()
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if head is None or decoder is None or decoder is self.model:
            raise UnsupportedModelError(
                f"surprisal scores need the model's decoder and its output projection, which "
                f"{type(self.model).__name__} does not expose; use scoring='window' or 'reconstruction'")
        softcap = getattr(self.model.config.get_text_config(decoder=True), "final_logit_softcapping", None)

        def on_output(_module, _args, output):
            if self._chunk is None:
                return
            start_time = time.perf_counter()
            lo, hi = self._chunk
            self._chunk = None
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            if self._last_hidden is not None:  # the chunk's first token, predicted by the previous chunk's last
                hidden_all = torch.cat([self._last_hidden, hidden], dim=1)
                first = lo
            else:
                hidden_all, first = hidden, lo + 1
            self._last_hidden = hidden[:, -1:]
            targets = self.input_ids[:, first:hi]
            pred = hidden_all[:, : targets.shape[1]]
            step = SCORE_QUERIES  # [step, vocab] logits at a time
            for start in range(0, targets.shape[1], step):
                stop = min(targets.shape[1], start + step)
                logits = head(pred[:, start:stop]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, start:stop, None])[..., 0]
                self.nll[:, first + start:first + stop] = nll * self.attention_mask[:, first + start:first + stop]
            self.seconds += time.perf_counter() - start_time

        return _Hook(self.model.get_decoder(), on_output)

    def expect(self, lo: int, hi: int) -> None:
        """The next forward is the chunk ``[lo, hi)`` of the prompt."""
        self._chunk = (lo, hi)

    # --- shallow reconstruction, one pass per chunk ------------------------------------------------
    def after_chunk(self, cache: ChunkKVCache, lo: int, hi: int, positions: torch.Tensor) -> None:
        """Run each reconstruction pass for the chunk ``[lo, hi)`` on a fork of what ``cache`` holds
        (the chunk included) and raise each held token's copy score to what it got."""
        start_time = time.perf_counter()
        for spec in self.passes:
            layers = self.scored[spec]
            if not layers:
                continue
            chunk_ids = self.input_ids[:, lo:hi]
            real = self.attention_mask[:, lo:hi].sum(-1)
            ids, mask = scoring_tokens(spec, self.instructions(spec.instruction), chunk_ids, real.tolist())
            fork = cache.fork()
            held = {i: cache.layers[i].stored_length for i in layers}
            session = _CopySession(fork, layers, held)
            seen = positions[:, hi - 1] + 1  # each row's real tokens so far
            padded = bool((mask == 0).any()) or bool((self.attention_mask[:, :hi] == 0).any())
            for start in range(0, ids.shape[1], self.block):
                stop = min(ids.shape[1], start + self.block)
                session.query_valid = mask[:, start:stop].bool() if padded else None
                context = torch.cat([self.attention_mask[:, :hi], mask[:, :stop]], dim=1)
                pos = seen[:, None] + torch.arange(start, stop, device=ids.device)[None, :]
                with compression_session(session):
                    try:
                        self.model(input_ids=ids[:, start:stop], attention_mask=context, position_ids=pos, cache=fork,
                                   use_cache=True, logits_to_keep=1)
                    except ScoredEnough:
                        pass
            for i in layers:  # each held token's best copy score, by its prompt position
                slots = cache.layers[i].slot_positions()[:, 0, :]
                got = session.scores[i].amax(dim=1)
                # Each pass over its mean on the chunk's own real tokens: a pass's level follows what it
                # competes with (what is held, the chunk's length), not what the tokens are worth, and
                # unscaled it ranked whole chunks by when they came (studies/memory, issue 24).
                own = (slots >= lo) & self.attention_mask.gather(1, slots).bool()
                count = own.sum(-1, keepdim=True)
                level = torch.where(count > 0, (got * own).sum(-1, keepdim=True) / count.clamp(min=1), 1.0)
                # fillers point at position 0 with score 0: harmless under a max
                self.copy[spec].scatter_reduce_(1, slots, got / level.clamp(min=1e-12), "amax")
        self.seconds += time.perf_counter() - start_time

    # --- what a layer's re-selection sees --------------------------------------------------------
    def evidence(self, layer: PrunedLayer, seen: int) -> Evidence:
        """The scores of the slots ``layer`` holds, as :class:`~chunkkv.scorers.Evidence` in slot
        coordinates (surprisal ``[B, S]``, each pass's copy row ``[B, 1, S]``)."""
        slots = layer.slot_positions()[:, 0, :]
        evidence = Evidence()
        if self.surprisal:
            row = first_token_surprisal(self.nll[:, :seen], self.attention_mask[:, :seen])
            evidence.surprisal = row.gather(1, slots)
        for spec in self.passes:
            evidence.passes[spec] = {-1: self.copy[spec].gather(1, slots)[:, None, :]}
        return evidence


class _Hook:
    def __init__(self, module: torch.nn.Module, fn) -> None:
        self.module, self.fn, self.handle = module, fn, None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self.fn)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None
