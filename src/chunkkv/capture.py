"""One prefill, kept: the full cache of a prompt and what every method's scorer needs from it.

Compression prunes each layer only after that layer's own attention over the whole prompt, so the
prefill's hidden states, and therefore every layer's keys, values and queries, are the same for
every method (and equal to a full-cache prefill). :func:`capture_prefill` runs that prefill once
and keeps what the scorers need: each compressible layer's full keys and values, the queries of
the last ``window`` positions, on request H2O's accumulated scores (they need every query, so they
are computed during the capture) and each token's surprisal (from the final hidden states).
:func:`gather_evidence` then runs the scoring passes a scorer asks for, once per prompt, on forks of
the captured cache. :func:`chunkkv.pipeline.compress_from_capture` builds each method's compressed
context from it.

Cost: the capture holds the full cache (the memory of a full-cache prefill) plus ``window`` queries
per layer; each scoring pass is one more forward over its tokens.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .attention import attach, compression_session
from .cache import ChunkKVCache, PrunedLayer
from .errors import ChunkKVError, PromptError, UnsupportedModelError
from .prompt import check_positions, check_prompt, row_lengths
from .scorers import Evidence, LayerInputs, Scorer, resolve_scorer
from .scoring import accumulated_attention_scores, first_token_surprisal, token_surprisal
from .scoring_pass import run_pass

__all__ = ["PrefillCapture", "capture_prefill", "capture_prefix", "gather_evidence", "layer_scores"]


@dataclass
class PrefillCapture:
    """A full-cache prefill of one (batched) prompt, with what the scorers need to select.

    Attributes:
        cache: the uncompressed :class:`ChunkKVCache` (``[B, Hkv, T, d]`` per layer); never modified.
        input_ids / attention_mask: ``[B, T]`` the prompt as given (left-padded).
        next_logits: ``[B, vocab]`` logits after the prompt (identical for every method).
        window: queries kept per layer (the largest observation window a method may use).
        lengths: real tokens per row.
        queries: ``{layer: [B, Hq, window, d]}`` the last ``window`` query states of each compressible layer.
        scaling / softcap: ``{layer: float | None}`` as the model's attention used them.
        memo: ``{layer: {key: [B, Hkv, T]}}`` raw scores shared by methods (``LayerInputs.memo``).
        evidence: surprisal and scoring-pass results (:class:`chunkkv.scorers.Evidence`).
        instructions: ``text -> token ids`` for the passes' instructions (None: none can run).
        model: a weak reference to the model (scoring passes run on it).
        prefill_seconds: wall time of the capture's forward, less ``surprisal_seconds``, the time spent
        computing the surprisal inside it;
        ``pass_seconds`` the time of each scoring pass run so far.
    """

    cache: ChunkKVCache
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    next_logits: torch.Tensor | None
    window: int
    lengths: list[int]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)
    softcap: dict[int, float | None] = field(default_factory=dict)
    memo: dict[int, dict] = field(default_factory=dict)
    accumulated: bool = False
    evidence: Evidence = field(default_factory=Evidence)
    instructions: Callable[[str], torch.Tensor] | None = field(default=None, repr=False)
    model: Callable[[], Any] | None = field(default=None, repr=False)
    surprisal_seconds: float = 0.0
    prefill_seconds: float = 0.0
    pass_seconds: dict = field(default_factory=dict)

    def scoring_seconds(self, scorer: Scorer | None) -> float:
        """Time this capture spent on what ``scorer`` needs beyond the prefill (its passes, its surprisal)."""
        if scorer is None:
            return 0.0
        return sum(self.pass_seconds.get(p, 0.0) for p in scorer.passes()) + (
            self.surprisal_seconds if scorer.needs_surprisal else 0.0)

    @property
    def surprisal(self) -> torch.Tensor | None:
        """``[B, T]`` each prompt token's negative log-likelihood (padding 0), if captured."""
        return self.evidence.surprisal

    @property
    def key_valid(self) -> torch.Tensor | None:
        """``[B, T]`` bool, False at left padding; None when no row is padded."""
        width = self.input_ids.shape[1]
        return self.attention_mask.bool() if any(n != width for n in self.lengths) else None


class _Capture:
    """The attention wrapper's session during a capture: record, never prune."""

    def __init__(self, capture: PrefillCapture, key_valid: torch.Tensor | None) -> None:
        self.capture = capture
        self.key_valid = key_valid

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        cap = self.capture
        idx = module.layer_idx
        if idx in cap.queries or layer is not cap.cache.layers[idx]:
            return
        # A contiguous copy of the window: the scores then see the same values compress() slices.
        cap.queries[idx] = query[:, :, -cap.window:].contiguous()
        cap.scaling[idx] = kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5)
        cap.softcap[idx] = kwargs.get("softcap")
        cap.memo[idx] = {}
        if cap.accumulated:
            cap.memo[idx][("accumulated",)] = accumulated_attention_scores(
                query, key, cap.scaling[idx], self.key_valid, cap.softcap[idx])


def _surprisal_hook(model, capture: PrefillCapture, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """A forward hook on the decoder that turns its final hidden states into the capture's surprisal."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or decoder is None or decoder is model:
        raise UnsupportedModelError(
            f"surprisal scores need the model's decoder and its output projection, which {type(model).__name__} does "
            "not expose (get_decoder / get_output_embeddings); use scoring='window' or 'reconstruction'"
        )
    softcap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        start = now(hidden.device)
        capture.evidence.surprisal = token_surprisal(hidden, head, input_ids, attention_mask, softcap)
        capture.surprisal_seconds = now(hidden.device) - start

    return hook


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done (CUDA), for honest timings."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def capture_prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    window: int,
    accumulated: bool = False,
    surprisal: bool = False,
    instructions: Callable[[str], torch.Tensor] | None = None,
) -> PrefillCapture:
    """Run the prompt once with the full cache and capture what every method needs.

    Args:
        input_ids: ``[B, T]`` (or ``[T]``) token ids, left-padded for batches.
        attention_mask: ``[B, T]`` 1 for real tokens (None = no padding).
        window: the largest observation window of the methods to build (queries kept per layer).
        accumulated: also compute H2O's accumulated attention scores (needs every query; costs one
            blocked pass over the prompt per layer, as H2O itself does).
        surprisal: also compute every prompt token's negative log-likelihood
            (:func:`chunkkv.scoring.token_surprisal` on the final hidden states, in blocks).
        instructions: ``text -> token ids`` of the scoring passes' instructions
            (:func:`chunkkv.prompting.instructions`), for scorers that run a pass.

    Layers the cache cannot compress (sliding-window layers whose window is shorter than the prompt)
    are kept as the model keeps them and captured for nobody.
    """
    input_ids, attention_mask = check_prompt(input_ids, attention_mask)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ChunkKVError(f"window={window!r} must be an int >= 1 (queries to keep per layer)")
    lengths = row_lengths(attention_mask)
    check_positions(model.config, max(lengths))
    attach(model)
    width = input_ids.shape[1]
    cache = ChunkKVCache(model.config, prompt_length=width)
    if not cache.pruned_layers:
        raise UnsupportedModelError(
            f"every attention layer of this model is sliding-window and shorter than the prompt ({width} tokens): "
            "the cache is already bounded and there is nothing to compress; use method 'full'")
    capture = PrefillCapture(cache, input_ids, attention_mask, None, min(window, width), lengths,
                             accumulated=accumulated, instructions=instructions, model=weakref.ref(model))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = time.perf_counter()
    hook = None
    if surprisal:
        hook = model.get_decoder().register_forward_hook(_surprisal_hook(model, capture, input_ids, attention_mask))
    try:
        with compression_session(_Capture(capture, capture.key_valid)):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=True, logits_to_keep=1)
    finally:
        if hook is not None:
            hook.remove()
    # the surprisal's output projection runs inside the forward: counted as scoring, not prefill
    capture.prefill_seconds = time.perf_counter() - start - capture.surprisal_seconds
    capture.next_logits = out.logits[:, -1, :]
    missing = [i for i in cache.pruned_layers if i not in capture.queries]
    if missing:
        raise UnsupportedModelError(f"layers {missing} did not go through chunkkv's attention during the capture")
    return capture


def capture_prefix(capture: PrefillCapture, n: int) -> PrefillCapture:
    """The capture of the first ``n`` prompt tokens, cut from a capture of the whole prompt.

    A causal model's keys, values and queries of a prefix do not depend on what follows, so this
    is what ``capture_prefill`` of ``input_ids[:, :n]`` would hold — how the question-agnostic
    setting (compress the context, then feed the question) is served from a query-aware capture.
    It keeps the queries of positions ``[n - w, n)`` with ``w = capture.window - (T - n)``, so
    capture with ``window >= (T - n) + method window``. Unpadded prompts only; no H2O scores; the
    surprisal (if captured) is the prefix's; scoring passes run again on the prefix when asked;
    ``next_logits`` is None (feed new tokens with :func:`chunkkv.extend` before decoding).
    """
    width = capture.input_ids.shape[1]
    if any(n_real != width for n_real in capture.lengths):
        raise ChunkKVError("capture_prefix needs an unpadded prompt")
    if not 0 < n < width:
        raise ChunkKVError(f"prefix length {n} must be in [1, {width - 1}]")
    if len(capture.cache.pruned_layers) != len(capture.cache.layers):
        raise ChunkKVError("capture_prefix needs a model whose every layer is compressible (no sliding-window layers)")
    window = capture.window - (width - n)
    if window < 1:
        raise ChunkKVError(f"the capture kept {capture.window} queries, none inside the first {n} tokens; "
                           f"capture with window > {width - n}")
    cache = capture.cache.fork()
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
        layer.logical_length = n
    surprisal = capture.surprisal
    return PrefillCapture(
        cache, capture.input_ids[:, :n], capture.attention_mask[:, :n], None, window, [n],
        queries={i: q[:, :, q.shape[2] - (width - n) - window: q.shape[2] - (width - n)] for i, q in capture.queries.items()},
        scaling=dict(capture.scaling), softcap=dict(capture.softcap), memo={i: {} for i in capture.memo},
        evidence=Evidence(surprisal=None if surprisal is None else first_token_surprisal(
            surprisal[:, :n], capture.attention_mask[:, :n])),
        instructions=capture.instructions, model=capture.model, prefill_seconds=capture.prefill_seconds,
    )


def gather_evidence(capture: PrefillCapture, scorer: Scorer, layers: list[int], *, block: int = 512,
                    chunk: int | str | None = "auto") -> None:
    """Make sure ``capture.evidence`` holds what ``scorer`` needs for the compressed ``layers``
    (its leader layers): run each of its scoring passes that has not run for them yet.

    Raises :class:`PromptError` when the scorer needs surprisal the capture did not compute, or an
    instruction no one can tokenize.
    """
    if scorer.needs_surprisal and capture.evidence.surprisal is None:
        raise PromptError(f"scoring={scorer.name!r} needs a capture made with capture_prefill(..., surprisal=True)")
    for spec in scorer.passes():
        wanted = spec.layers(capture.cache.pruned_layers, layers)
        done = capture.evidence.passes.get(spec, {})
        todo = [i for i in wanted if i not in done]
        if not todo or (spec.depth is not None and done):
            continue
        if capture.instructions is None:
            raise PromptError(
                f"scoring={scorer.name!r} feeds the instruction {spec.instruction!r} after the context: pass "
                "tokenizer=... (or scoring_prompt=<token ids>) so it can be tokenized")
        model = capture.model() if capture.model is not None else None
        if model is None:
            raise ChunkKVError("the model of this capture is gone; the scoring pass cannot run")
        start = now(capture.input_ids.device)
        found = run_pass(model, capture, spec, todo, capture.instructions(spec.instruction), block, chunk)
        capture.pass_seconds[spec] = capture.pass_seconds.get(spec, 0.0) + now(capture.input_ids.device) - start
        capture.evidence.passes[spec] = {**done, **found}


def layer_scores(capture: PrefillCapture, scoring: str | Scorer, layers: list[int], *, window: int | None = None,
                 block: int = 512, chunk: int | str | None = "auto") -> dict[int, torch.Tensor]:
    """``{layer: [B, Hkv, T]}`` scores of ``scoring`` on a capture (padded coordinates), its evidence
    gathered first (scoring passes run once per capture). ``window``: the observation window of a
    window scorer (default: every captured query)."""
    scorer = resolve_scorer(scoring)
    if scorer.needs_all_queries:
        raise ChunkKVError("accumulated scores need every prompt query: read them from capture.memo")
    gather_evidence(capture, scorer, layers, block=block, chunk=chunk)
    width = capture.input_ids.shape[1]
    lengths = torch.tensor(capture.lengths, device=capture.input_ids.device)
    out = {}
    for layer in layers:
        inputs = LayerInputs(
            queries=capture.queries[layer], keys=capture.cache.layers[layer].keys, scaling=capture.scaling[layer],
            softcap=capture.softcap[layer], key_valid=capture.key_valid, lengths=lengths, pad=width - lengths,
            kept=lengths, slots=width, layer=layer, memo=capture.memo[layer], evidence=capture.evidence,
        )
        out[layer] = scorer.scores(inputs, window or capture.window)
    return out
