"""Question-agnostic scoring: score a context before any question is known.

With ``scoring="window"`` a method scores the prompt with its own last ``window`` queries; when the
prompt is a document compressed before the question, those tokens say nothing about what will be
asked. The two alternatives here run *after* the context's prefill, on the full cache, and their
extra tokens never stay in it:

* ``"reconstruction"`` (KVzip's signal): the model is fed a "repeat the previous context" prompt
  followed by the context itself, teacher-forced, :data:`RECONSTRUCTION_CHUNK` context tokens at a
  time (KVzip's chunked form: each chunk follows the prompt on a fresh copy of the context's
  cache, so the repeated tokens sit just past the context, inside the positions the model was
  trained on), in forward passes of ``block`` tokens; each context token scores the **largest**
  attention it receives from those queries, per KV head (max over the group's query heads). A
  token the model must look at to reproduce the text scores high.
* ``"shallow_reconstruction"``: the same reconstruction tokens, run through the **first quarter**
  of the layers only (:data:`SHALLOW_DEPTH`; the forward stops there); each context token scores the largest attention it
  receives from any head of those layers, and that one score serves every layer and head (as
  surprisal's does), so ChunkKV keeps the same chunks on every layer; the prompt's first
  :data:`SHALLOW_SINK` tokens score the row's maximum (the copy queries ignore the prompt's head,
  and a cache without it loses the chat template's opening). About a quarter of the work of
  ``"reconstruction"``.
* ``"hybrid"``: surprisal plus shallow reconstruction, each divided by its row's largest value
  (so both count alike): a token scores high when it is unexpected *or* the copy heads need it.
  Costs both.
* ``"probe"``: a generic question-like prompt (``PROMPTS["probe"]``) is fed once; each token scores
  the attention it receives from the probe's queries, summed (a window-style score with a better
  window).
* ``"surprisal"`` (Selective Context's self-information, Li et al. 2023): each token scores its
  negative log-likelihood given what precedes it, computed from the prefill's own final hidden
  states (:func:`chunkkv.scoring.token_surprisal`): no extra tokens and no extra forward, one
  output projection over the prompt. The same scores serve every layer and head, so ChunkKV keeps
  the same chunks on every layer (the least predictable spans of the text).

Order of work (why this is not compress's per-layer hook): every layer's full cache is needed
before scoring, because the scoring tokens attend over the whole context on every layer. So the
context is prefilled with the full cache (:func:`chunkkv.multi.capture_prefill`), the scoring
tokens run on a fork of it (for each scored layer the attention wrapper lets the session compute
the attention itself, :func:`chunkkv.scoring.attend_and_score`: one softmax gives the layer's
output and the scores, so the model's own attention does not run beside it), and then every
layer is selected and pruned from the
capture (:func:`chunkkv.multi.compress_from_capture`: ChunkKV ranks whole chunks on the head-summed
scores, reuse followers take their leader's indices and are not scored; per-head methods pick per
head). Positions stay the original ones and the next-token logits are the prefill's.

The question-agnostic default (:func:`agnostic_method`, what ``chunkkv.generate`` and ``chunkkv
generate`` run when nothing else is asked for) is ``"hybrid"`` (surprisal plus shallow
reconstruction) with **one chunk per sentence**: a ChunkKV left at the paper's chunking gets
:data:`SENTENCE_CHUNKS` (chunks start after every sentence end, at most 30 tokens, ranked by the
mean square root of their tokens' scores plus 0.2 x the root of their strongest token, no
pooling), so a fact is kept or dropped whole instead of being cut by a fixed 10-token grid
(docs/question-agnostic.md has the measurements that chose it). Surprisal keeps the unexpected
facts, the copy heads of shallow reconstruction the plainly worded ones.

Cost: peak memory of a full-cache prefill; time of the prefill plus one forward pass over the
scoring tokens (about the context's length for reconstruction); for surprisal, the output
projection over the prompt (0.2-0.36x the prefill for SmolLM2-135M on CPU, whose vocabulary
projection is a quarter of its compute; less for larger models); for shallow reconstruction, a
quarter of the layers' forward over the context again (hybrid, the default: 0.76-1.10x the
prefill for SmolLM2 on CPU at 1k-8k; docs/question-agnostic.md has the measurements).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import replace

import torch

from .boundaries import boundary_token_ids
from .cache import PrunedLayer
from .compress import CompressedContext, _now, plan_layers
from .errors import PromptError, UnsupportedModelError
from .methods import ChunkKV, Method
from .multi import capture_prefill, compress_from_capture
from .scoring import attend_and_score, max_attention_scores

_REPEAT = "Repeat the previous context exactly."
#: The instructions fed before scoring (after a separator, as a question would be).
PROMPTS = {
    "reconstruction": _REPEAT,
    "shallow_reconstruction": _REPEAT,
    "hybrid": _REPEAT,
    "probe": "List every specific fact, name, number and secret stated in the document above.",
}
_REDUCE = {"reconstruction": "max", "shallow_reconstruction": "max", "probe": "sum"}
#: The share of the layers (the first ones, rounded up) that ``"shallow_reconstruction"`` runs and scores.
SHALLOW_DEPTH = 0.25
#: The fewest context tokens repeated per reconstruction chunk (:func:`agnostic_scores`' ``chunk``):
#: chunks are as long as the model's trained positions allow, never shorter than this.
RECONSTRUCTION_CHUNK = 512
#: ``"shallow_reconstruction"`` gives each row's first ``SHALLOW_SINK`` real tokens the row's largest
#: score, so the prompt's head (the attention sink, a chat template's opening) is kept: the copy
#: queries barely look at it, and a cache without it answers the question as more essay text.
SHALLOW_SINK = 4
#: The scorings read from the prefill's own surprisal (``capture_prefill(..., surprisal=True)``).
NEEDS_SURPRISAL = frozenset({"surprisal", "hybrid"})
#: The scoring question-agnostic ``chunkkv.generate`` / ``chunkkv generate`` use for a scoring
#: method left at ``scoring="window"`` (chosen by docs/question-agnostic.md's measurements).
AGNOSTIC_DEFAULT = "hybrid"
#: The chunking question-agnostic compression gives a ChunkKV left at the paper's (fixed chunks of
#: 10, mean, max pooling 7), with ``boundary_ids`` = the tokenizer's sentence ends.
SENTENCE_CHUNKS = {"segmentation": "sentence", "chunk_size": 30, "chunk_reduce": "sqrt_mean", "peak_weight": 0.2,
                   "kernel": 1}
_PAPER_CHUNKING = ("segmentation", "boundary_ids", "chunk_size", "chunk_reduce", "peak_weight", "pooling", "kernel")


def shallow_layers(num_layers: int) -> list[int]:
    """The layers ``"shallow_reconstruction"`` scores: the first ``SHALLOW_DEPTH`` of them, rounded up."""
    return list(range(max(1, math.ceil(num_layers * SHALLOW_DEPTH))))


class _ScoredEnough(Exception):
    """Raised by the scoring session after its last layer: the rest of the forward is not needed."""


def agnostic_method(
    method: Method | None, scoring: str | None = None, full_prefill: bool = True, tokenizer=None
) -> Method | None:
    """The method a question-agnostic compression runs.

    ``scoring`` given: the method with that scoring, nothing else changed. Otherwise a scoring
    method left at ``"window"`` gets :data:`AGNOSTIC_DEFAULT`, and a :class:`ChunkKV` also left
    at the paper's chunking gets :data:`SENTENCE_CHUNKS` with the ``tokenizer``'s sentence ends
    (when a tokenizer is given). Only when the prefill holds the full cache: ``full_prefill=False``
    (a chunked prefill) keeps the method as it is. Other methods are returned unchanged.
    """
    if method is None or not method.scores_tokens:
        if scoring not in (None, "window") and method is not None:
            return replace(method, scoring=scoring)  # raises the method's own clear error
        return method
    if scoring is not None:
        return method if method.scoring == scoring else replace(method, scoring=scoring)
    if method.scoring != "window" or AGNOSTIC_DEFAULT == "window" or not full_prefill:
        return method
    method = replace(method, scoring=AGNOSTIC_DEFAULT)
    defaults = ChunkKV.__dataclass_fields__
    if tokenizer is not None and type(method) is ChunkKV and all(
            getattr(method, name) == defaults[name].default for name in _PAPER_CHUNKING):
        ends = boundary_token_ids(tokenizer, clauses=False)
        if ends:  # a vocabulary with no sentence ends keeps fixed chunks
            method = replace(method, boundary_ids=ends, **SENTENCE_CHUNKS)
    return method


def scoring_prompt(
    tokenizer, scoring: str, separator: str = "\n\n", instruction: str | None = None, chat: bool | None = None
) -> torch.Tensor:
    """Token ids ``[n]`` fed after the context to score it: ``separator + instruction``, then the
    end of the user's turn and the assistant's opening when the tokenizer has a chat template
    (the way a question is asked of a chat-templated context), else a newline.

    ``instruction`` defaults to ``PROMPTS[scoring]``; ``chat`` (None = when the tokenizer has a
    chat template) says whether the context was rendered with the chat template.
    """
    if scoring not in PROMPTS:
        raise PromptError(f"scoring={scoring!r} takes no prompt; scoring prompts exist for {', '.join(PROMPTS)}")
    text = separator + (instruction if instruction is not None else PROMPTS[scoring])
    suffix = "\n"
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        marker = "\x00chunkkv\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
        )
        if marker in rendered:
            suffix = rendered.split(marker, 1)[1]
    ids = tokenizer(text + suffix, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return ids


class _ScoringSession:
    """The attention wrapper's session during the scoring pass: collect scores, never prune."""

    def __init__(self, layers: set[int], context_len: int, reduce: str, stop_early: bool = False) -> None:
        self.cache = None  # the fork the current segment appends to (set per segment)
        self.layers = layers
        # Stop the forward after the last scored layer: only valid when the pass's own output (its
        # logits, the later layers' cache) is not wanted, as in shallow reconstruction.
        self.stop_after = max(layers) if stop_early and layers else None
        self.context_len = context_len
        self.reduce = reduce
        self.key_valid: torch.Tensor | None = None
        self.query_valid: torch.Tensor | None = None
        self.scores: dict[int, torch.Tensor] = {}

    def attend(self, module, layer: PrunedLayer, query, key, value, kwargs) -> tuple[torch.Tensor, None] | None:
        """The attention of a scored layer, computed once for its output and its scores (the
        wrapper then skips the model's own); None (the model's attention runs, then
        :meth:`on_attention`) for other layers and for features this does not compute."""
        if not self._scored(module, layer) or any(
                kwargs.get(name) is not None for name in ("sliding_window", "s_aux", "position_bias")):
            return None
        output, block = attend_and_score(
            query, key, value, self._scaling(module, key, kwargs), self.context_len, self.key_valid,
            self.query_valid, kwargs.get("softcap"), self.reduce,
        )
        self._add(module.layer_idx, block)
        return output.transpose(1, 2).contiguous(), None  # [B, q, Hq, dv], as the attention functions return

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        if not self._scored(module, layer):
            return
        self._add(module.layer_idx, max_attention_scores(
            query, key, self._scaling(module, key, kwargs), self.context_len, self.key_valid, self.query_valid,
            kwargs.get("softcap"), self.reduce,
        ))

    def _scored(self, module, layer: PrunedLayer) -> bool:
        return module.layer_idx in self.layers and layer is self.cache.layers[module.layer_idx]

    @staticmethod
    def _scaling(module, key, kwargs) -> float:
        return kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5)

    def _add(self, idx: int, block: torch.Tensor) -> None:
        previous = self.scores.get(idx)
        if previous is None:
            self.scores[idx] = block
        elif self.reduce == "max":
            self.scores[idx] = torch.maximum(previous, block)
        else:
            self.scores[idx] = previous + block
        if idx == self.stop_after:
            raise _ScoredEnough


def _scoring_tokens(
    scoring: str, prompt: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    lengths: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, R]`` scoring tokens and their mask: the prompt, then (reconstruction)
    each row's own real context tokens."""
    device = input_ids.device
    prompt = torch.zeros(0, dtype=input_ids.dtype, device=device) if prompt is None else prompt.to(device).reshape(-1)
    batch, width = input_ids.shape
    if scoring == "probe":
        if prompt.numel() == 0:
            raise PromptError(
                "scoring='probe' needs the probe's token ids: pass scoring_prompt="
                "chunkkv.agnostic.scoring_prompt(tokenizer, 'probe') to compress (chunkkv.generate does it)"
            )
        ids = prompt[None].expand(batch, -1)
        return ids, torch.ones_like(ids)
    n = prompt.numel()
    total = n + max(lengths)
    ids = torch.zeros(batch, total, dtype=input_ids.dtype, device=device)
    mask = torch.zeros(batch, total, dtype=torch.long, device=device)
    ids[:, :n] = prompt
    # Each row's real tokens are the last ``lengths[b]`` of its left-padded row: shift them left
    # by its padding (one gather, no loop over rows).
    pad = width - torch.tensor(lengths, device=device)
    src = (torch.arange(total - n, device=device)[None, :] + pad[:, None]).clamp(max=width - 1)
    real = torch.arange(total - n, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    ids[:, n:] = torch.where(real, torch.gather(input_ids, 1, src), 0)
    mask[:, :n] = 1
    mask[:, n:] = real.long()
    return ids, mask


def auto_chunk(config, context_len: int, n_prompt: int) -> int | None:
    """The reconstruction chunk ``chunk="auto"`` uses: as many context tokens as fit between the
    context plus the prompt and the model's trained length (``max_position_embeddings``), at least
    :data:`RECONSTRUCTION_CHUNK`; None (one pass) when the config gives no length.

    Why: repeated in one pass, the copy of an 8k context sits at positions 8k-16k, past an 8k
    model's trained range, and its attention there no longer finds the tokens it copies.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    return max(RECONSTRUCTION_CHUNK, limit - context_len - n_prompt)


def _segments(
    ids: torch.Tensor, mask: torch.Tensor, n_prompt: int, chunk: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The scoring tokens ``[B, R]`` as the segments fed one after another, each on a fresh fork of
    the context's cache: the prompt's ``n_prompt`` tokens, then ``chunk`` tokens of the repeated
    context (KVzip's chunked reconstruction). ``chunk=None``: one segment, everything."""
    total = ids.shape[1]
    if chunk is None or total - n_prompt <= chunk:
        return [(ids, mask)]
    head = slice(0, n_prompt)
    return [(torch.cat([ids[:, head], ids[:, start:start + chunk]], dim=1),
             torch.cat([mask[:, head], mask[:, start:start + chunk]], dim=1))
            for start in range(n_prompt, total, chunk)]


@torch.inference_mode()
def agnostic_scores(
    model: torch.nn.Module,
    capture,
    scoring: str,
    layers: list[int],
    prompt: torch.Tensor | None = None,
    block: int = 512,
    chunk: int | str | None = "auto",
) -> dict[int, torch.Tensor]:
    """Run the scoring tokens after a captured prefill and return ``{layer: [B, Hkv, T]}`` scores
    (padded coordinates, like window scores) for ``layers``. The capture's cache is not changed.

    Args:
        capture: a :class:`chunkkv.multi.PrefillCapture` of the context.
        scoring: ``"reconstruction"``, ``"shallow_reconstruction"`` (one score for every layer: the
            max over the first quarter of the layers' heads; the forward stops there), ``"probe"``,
            ``"surprisal"`` (read from the capture, which must be made with ``surprisal=True``; no
            forward pass) or ``"hybrid"`` (the last two, each over its row maximum).
        prompt: ``[n]`` token ids of the instruction (:func:`scoring_prompt`); reconstruction may
            run without one (the context is then repeated right after itself).
        block: scoring tokens per forward pass (memory O(block x context) per head; the scores do
            not depend on it).
        chunk: reconstruction repeats the context ``chunk`` tokens at a time, each chunk after
            the prompt on a fresh copy of the context's cache (KVzip's chunked form: the repeated
            tokens never sit further than ``prompt + chunk`` past the context, and each query
            attends over at most ``context + prompt + chunk`` keys). ``"auto"``: the longest
            chunk that keeps every position inside the model's ``max_position_embeddings``, at
            least :data:`RECONSTRUCTION_CHUNK` (so a context shorter than half the trained
            length is repeated in one pass); None: one pass. The scores depend on it.
    """
    if chunk != "auto" and chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise PromptError(f"chunk={chunk!r} must be an int >= 1, 'auto' or None (context tokens repeated per chunk)")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise PromptError(f"scoring_block={block!r} must be an int >= 1 (scoring tokens per forward pass)")
    if scoring in NEEDS_SURPRISAL and capture.surprisal is None:
        raise PromptError(f"scoring={scoring!r} needs a capture made with capture_prefill(..., surprisal=True)")
    if scoring == "surprisal":
        heads = capture.cache.layers[layers[0]].keys.shape[1] if layers else 1
        per_head = capture.surprisal[:, None, :].expand(-1, heads, -1)
        return {layer: per_head for layer in layers}
    if scoring == "hybrid":
        if not layers:
            return {}
        copy = agnostic_scores(model, capture, "shallow_reconstruction", layers[:1], prompt, block, chunk)[layers[0]]
        unexpected = capture.surprisal[:, None, :].clamp(min=0)
        mixed = copy / copy.amax(-1, keepdim=True).clamp(min=1e-12) + \
            unexpected / unexpected.amax(-1, keepdim=True).clamp(min=1e-12)
        return {layer: mixed for layer in layers}
    shallow = scoring == "shallow_reconstruction"
    if shallow and not layers:
        return {}
    scored = shallow_layers(len(capture.cache.layers)) if shallow else layers
    ids, mask = _scoring_tokens(scoring, prompt, capture.input_ids, capture.attention_mask, capture.lengths)
    width = capture.input_ids.shape[1]
    device = ids.device
    session = _ScoringSession(set(scored), width, _REDUCE[scoring], stop_early=shallow)
    real = torch.tensor(capture.lengths, device=device)
    n_prompt = 0 if prompt is None or scoring == "probe" else prompt.numel()
    if chunk == "auto":
        chunk = auto_chunk(model.config, width, n_prompt)
    context_padded = bool((capture.attention_mask == 0).any())
    from .attention import compression_session

    for seg_ids, seg_mask in _segments(ids, mask, n_prompt, chunk if scoring != "probe" else None):
        # each segment on a fresh fork (appending to it leaves the capture's tensors as they are)
        cache = session.cache = capture.cache.fork()
        padded = context_padded or bool((seg_mask == 0).any())
        for start in range(0, seg_ids.shape[1], block):
            stop = min(seg_ids.shape[1], start + block)
            seen = torch.cat([capture.attention_mask, seg_mask[:, :stop]], dim=1)
            session.key_valid = seen.bool() if padded else None
            session.query_valid = seg_mask[:, start:stop].bool() if padded else None
            positions = real[:, None] + torch.arange(start, stop, device=device)[None, :]
            with compression_session(session):
                try:
                    model(input_ids=seg_ids[:, start:stop], attention_mask=seen, position_ids=positions, cache=cache,
                          use_cache=True, logits_to_keep=1)
                except _ScoredEnough:
                    pass
    missing = [i for i in scored if i not in session.scores]
    if missing:
        raise UnsupportedModelError(f"layers {missing} did not go through chunkkv's attention during scoring")
    if shallow:  # one score per token: the largest any head of the scored layers gave it
        shared = torch.stack([session.scores[i] for i in scored]).amax(dim=(0, 2))
        pad = (width - real)[:, None]  # each row's first real position (rows are left-padded)
        offset = torch.arange(width, device=device)[None, :] - pad
        head = (offset >= 0) & (offset < SHALLOW_SINK)
        shared = torch.where(head, shared.amax(dim=-1, keepdim=True), shared)
        per_head = shared[:, None, :].expand(-1, session.scores[scored[0]].shape[1], -1)
        return {layer: per_head for layer in layers}
    return session.scores


def leader_layers(method: Method, capture) -> list[int]:
    """The layers whose scores ``method`` needs (reuse followers are not scored)."""
    plan = plan_layers(method, capture.lengths, capture.input_ids.shape[1], capture.cache.pruned_layers,
                       capture.input_ids.device)
    return sorted(layer for layer, leader in plan.leaders.items() if layer == leader)


@torch.inference_mode()
def compress_agnostic(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    method: Method,
    *,
    scoring_prompt: torch.Tensor | None = None,
    scoring_block: int = 512,
) -> CompressedContext:
    """:func:`chunkkv.compress` for ``method.scoring`` other than ``"window"`` (see the
    module docstring). ``stats.scoring_seconds`` is the scoring pass's time (for surprisal: the
    output projection inside the prefill), ``prefill_seconds`` the context's prefill."""
    from .cache import ChunkKVCache

    probe = ChunkKVCache(model.config)
    if len(probe.pruned_layers) != len(probe.layers):
        raise UnsupportedModelError(
            f"scoring={method.scoring!r} needs a model whose every layer is full attention (sliding-window layers, "
            "as in Gemma 2/3, are not supported yet); use scoring='window'"
        )
    capture = capture_prefill(model, input_ids, attention_mask, window=max(1, method.window),
                              surprisal=method.scoring in NEEDS_SURPRISAL)
    layers = leader_layers(method, capture)
    device = capture.input_ids.device
    start = _now(device)
    scores = agnostic_scores(model, capture, method.scoring, layers, scoring_prompt, scoring_block) if layers else {}
    seconds = _now(device) - start + capture.surprisal_seconds
    for layer, value in scores.items():
        capture.memo[layer][(method.scoring,)] = value
    ctx = compress_from_capture(capture, method)
    ctx.stats.scoring_seconds = seconds
    ctx.source = weakref.ref(model)
    return ctx
