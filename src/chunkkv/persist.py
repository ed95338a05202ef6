"""Save a compressed context to disk and load it back for the same model.

One safetensors file holds everything needed to continue exactly where :func:`chunkkv.compress`
stopped:

* per cache layer ``i``: ``layer.i.keys`` / ``layer.i.values`` ``[B, Hkv, stored, d]`` (the kept
  K/V, model dtype), and for pruned layers ``layer.i.valid`` ``[B, stored]`` (filler slots) and
  ``layer.i.kept_index`` ``[B, 1 or Hkv, kept]`` (original positions kept);
* ``input_ids`` / ``attention_mask`` ``[B, T]`` (the prompt, left-padded) and ``next_logits``
  ``[B, vocab]``;
* JSON metadata (key ``chunkkv``): format version, per-layer logical lengths and flags, the method
  (class name + fields, and its ``describe()`` line), the stats, the decode budget when one is set
  (and ``layer.i.recent_queries``: the last queries a reuse leader saw, which a decode budget's next
  re-selection scores with, so one set after loading decodes as it would in memory), a fingerprint
  of the model (config hash, dtype, layers, heads, head dim, a hash of a sample of every weight
  tensor) and a SHA-256 of every tensor's name, dtype, shape and bytes;
* ``chunkkv_sha256``: a SHA-256 of the metadata text itself, so the header is checked as well as
  the tensors (a flipped bit in a layer's ``logical_length`` would otherwise load and decode
  garbage). The tensor table of the safetensors header is covered by the tensors' checksum.

Loading checks both checksums, then the metadata's structure, then the fingerprint against the
model it is given, so a context saved for another model or dtype, or a damaged file, raises
:class:`ContextFileError` instead of producing a silently wrong cache (``studies/robustness/
header_bitflip.py`` flips every bit of a header to check it). Files are written through a
temporary file and a rename (a failed save leaves no half file), readable like any new file.
This module is the file format only; :meth:`chunkkv.CompressedContext.save` and
:func:`chunkkv.load_context` use it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .cache import ChunkKVCache, PrunedLayer
from .errors import ChunkKVError
from .methods import METHODS, Method
from .outputs import make_shareable
from .scorers import scorer_from_json

FORMAT = "chunkkv-context"
#: 2: the metadata has its own checksum (``chunkkv_sha256``) and may hold a decode budget.
VERSION = 2
#: The first format (no header checksum, no decode budget): still read, with a warning.
LEGACY_VERSION = 1
_META_KEY = "chunkkv"
_SUM_KEY = "chunkkv_sha256"
# Config entries that do not change what the cache means (how the model was loaded, not what it is).
_VOLATILE = {
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_name_or_path",
    "transformers_version", "torch_dtype", "dtype", "_commit_hash", "quantization_config", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_experts_implementation",
}


class ContextFileError(ChunkKVError):
    """A saved context cannot be used: not a chunkkv file, damaged, or saved for another model."""


# --- model fingerprint ----------------------------------------------------------------------------
def _clean_config(value):
    if isinstance(value, dict):
        return {k: _clean_config(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_clean_config(v) for v in value]
    return value


def model_fingerprint(model: torch.nn.Module) -> dict:
    """What a saved cache depends on: architecture (config hash), dtype, shapes, and the weights.

    The weight hash covers the first 16 values of every parameter (float32 bytes), which tells two
    checkpoints of one architecture apart at negligible cost.
    """
    text = model.config.get_text_config(decoder=True)
    config = json.dumps(_clean_config(text.to_dict()), sort_keys=True, default=str)
    weights = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        weights.update(name.encode())
        weights.update(param.detach().reshape(-1)[:16].float().cpu().numpy().tobytes())
    heads = text.num_attention_heads
    return {
        "model_type": getattr(text, "model_type", "?"),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "weights_sha256": weights.hexdigest(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "num_layers": text.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
    }


def _shape_line(fp: dict) -> str:
    return (f"{fp['model_type']}, {fp['num_layers']} layers, {fp['num_attention_heads']} query / "
            f"{fp['num_key_value_heads']} KV heads x {fp['head_dim']}, {fp['dtype']}")


# --- checksums ------------------------------------------------------------------------------------
def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _header_digest(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def _method_json(method: Method) -> dict:
    return {"name": method.name, "fields": method.settings(), "describe": method.describe()}


def _method_from_json(data: dict, path: Path) -> Method:
    cls = METHODS.get(data["name"])
    if cls is None:
        raise ContextFileError(f"{path} was compressed with method {data['name']!r}, unknown to this chunkkv")
    known = {f.name for f in fields(cls)}
    params = {k: v for k, v in data["fields"].items() if k in known}
    if isinstance(params.get("scoring"), dict):
        params["scoring"] = scorer_from_json(params["scoring"])
    return cls(**params)


def _check_model_for(context: Any, model: torch.nn.Module) -> None:
    """Refuse to save ``context`` with a model it was not compressed for (the file would fit no model)."""
    source = context.source() if getattr(context, "source", None) is not None else None
    if source is not None and source is not model and model_fingerprint(source) != model_fingerprint(model):
        raise ChunkKVError(
            "this context was compressed by another model than the one given to save(); save it with the model "
            "that compressed it (ctx.save(path) uses it), or recompress with this one"
        )
    fp = model_fingerprint(model)
    layers = context.cache.layers
    if len(layers) != fp["num_layers"]:
        raise ChunkKVError(f"this context has {len(layers)} cache layers but the model given to save() has "
                           f"{fp['num_layers']}: save it with the model that compressed it")
    for i, layer in enumerate(layers):
        keys = getattr(layer, "keys", None)
        if not isinstance(keys, torch.Tensor) or keys.numel() == 0:
            continue
        if keys.shape[1] != fp["num_key_value_heads"] or keys.shape[-1] != fp["head_dim"] or \
                str(keys.dtype).replace("torch.", "") != fp["dtype"]:
            raise ChunkKVError(
                f"cache layer {i} holds {keys.shape[1]} KV heads x {keys.shape[-1]} in {keys.dtype} but the model "
                f"given to save() is {_shape_line(fp)}: save it with the model that compressed it")


# --- save -----------------------------------------------------------------------------------------
def write_context(context: Any, path: str | os.PathLike, model: torch.nn.Module) -> int:
    """Write ``context`` (compressed for ``model``) to ``path``; returns the file size in bytes.

    Save a context before extending it with a question (or save a ``fork()`` taken then): what is
    saved is the cache as it is now, with its decode budget when one is set. The file is written
    under a temporary name and renamed into place. Raises :class:`ChunkKVError` when ``model`` is
    not the model the context was compressed for, :class:`ContextFileError` when the file cannot
    be written.
    """
    from safetensors.torch import save_file

    _check_model_for(context, model)
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    cache = context.cache
    budget = cache.decode_budget
    for i, layer in enumerate(cache.layers):
        entry: dict = {"kind": "pruned" if isinstance(layer, PrunedLayer) else (
            "sliding" if isinstance(layer, DynamicSlidingWindowLayer) else "dynamic")}
        initialized = bool(getattr(layer, "is_initialized", False)) and layer.keys is not None and layer.keys.numel() > 0
        entry["initialized"] = initialized
        if initialized:
            tensors[f"layer.{i}.keys"] = layer.keys.contiguous()
            tensors[f"layer.{i}.values"] = layer.values.contiguous()
        if isinstance(layer, PrunedLayer):
            entry.update(logical_length=layer.logical_length, needs_wrapper=layer.needs_wrapper,
                         sliding_window=layer.sliding_window)
            if layer.valid is not None:
                tensors[f"layer.{i}.valid"] = layer.valid.contiguous()
            if layer.kept_index is not None:
                tensors[f"layer.{i}.kept_index"] = layer.kept_index.contiguous()
            if layer.recent_queries is not None:  # what a decode budget's next re-selection scores with
                tensors[f"layer.{i}.recent_queries"] = layer.recent_queries.contiguous()
        elif isinstance(layer, DynamicSlidingWindowLayer):
            entry.update(cumulative_length=layer.cumulative_length, sliding_window=layer.sliding_window)
        elif type(layer) is not DynamicLayer:
            raise ContextFileError(f"cache layer {i} is a {type(layer).__name__}, which chunkkv cannot save")
        layers.append(entry)
    tensors, aliases = _dedupe(tensors)
    tensors["input_ids"] = context.input_ids.contiguous()
    tensors["attention_mask"] = context.attention_mask.contiguous()
    tensors["next_logits"] = context.next_logits.contiguous()
    stats = asdict(context.stats)
    stats["kept"] = {str(k): v for k, v in stats["kept"].items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "layers": layers,
        "method": _method_json(context.method),
        "stats": stats,
        "model": model_fingerprint(model),
        "aliases": aliases,
        "tensors_sha256": _tensor_digest(tensors),
    }
    if budget is not None:
        meta["decode_budget"] = {"keep": budget.keep, "every": budget.every, "method": _method_json(budget.method)}
    raw = json.dumps(meta)
    path = Path(path)
    if path.is_dir():
        raise ContextFileError(f"cannot write the context to {path}: it is a folder; give a file name")
    if not path.parent.is_dir():
        raise ContextFileError(f"cannot write the context to {path}: the folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={_META_KEY: raw, _SUM_KEY: _header_digest(raw)})
        os.replace(tmp, path)
    except Exception as exc:  # OSError, or safetensors' own error for a folder / a missing folder
        reason = getattr(exc, "strerror", None) or str(exc).split(" at path ")[0].split("I/O error: ")[-1]
        raise ContextFileError(f"cannot write the context to {path}: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)
    make_shareable(path)  # safetensors writes 0600; a saved context is an ordinary file
    return path.stat().st_size


def header_bytes(path: str | os.PathLike) -> int:
    """Size of the safetensors header (8-byte length + JSON: tensor table and metadata) of a file."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tensors shared between layers (reuse followers' ``kept_index``) once.

    Returns the unique tensors and ``{alias: stored name}`` for the others.
    """
    unique: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


# --- load -----------------------------------------------------------------------------------------
def _read(path: Path, device) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ContextFileError(f"no saved context at {path} (give the file written by ctx.save / --save-context)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            raw = metadata.get(_META_KEY)
            if raw is None:
                raise ContextFileError(
                    f"{path} is a safetensors file but not a chunkkv context (no '{_META_KEY}' metadata); "
                    "save one with ctx.save(path) or `chunkkv generate --save-context`"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except ContextFileError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise ContextFileError(
            f"{path} is not a readable chunkkv context (truncated, corrupted or another file type): {exc}"
        ) from None
    header_sum = metadata.get(_SUM_KEY)
    legacy = False
    if header_sum is None:
        version = None
        try:
            version = json.loads(raw).get("version")
        except (json.JSONDecodeError, AttributeError):
            pass
        if version != LEGACY_VERSION:
            raise ContextFileError(f"{path} is corrupted: its header has no '{_SUM_KEY}' checksum")
        # a context saved by the first format: its tensors are checksummed, its header is not
        legacy = True
        warnings.warn(f"{path} was saved in chunkkv context format {LEGACY_VERSION}, whose header carries no "
                      "checksum: a damaged header cannot be told apart; save it again to get the checked format",
                      stacklevel=3)
    elif header_sum != _header_digest(raw):
        raise ContextFileError(
            f"{path} is corrupted: its header (the chunkkv metadata) does not match the checksum written when it was saved")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ContextFileError(f"{path}: the chunkkv metadata is not valid JSON (the file is corrupted)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ContextFileError(f"{path} is not a chunkkv context file (format {meta.get('format') if isinstance(meta, dict) else '?'!r})")
    if meta.get("version") != (LEGACY_VERSION if legacy else VERSION):
        raise ContextFileError(
            f"{path} was written in chunkkv context format version {meta.get('version')}, this chunkkv reads "
            f"version {VERSION}; recompress the document with this version"
        )
    if _tensor_digest(tensors) != meta.get("tensors_sha256"):
        raise ContextFileError(f"{path} is corrupted: its tensors do not match the checksum written when it was saved")
    return meta, {k: v.to(device) for k, v in tensors.items()}


def _check_model(path: Path, saved: dict, model: torch.nn.Module) -> None:
    here = model_fingerprint(model)
    if saved["config_sha256"] != here["config_sha256"] or any(
        saved[k] != here[k] for k in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    ):
        raise ContextFileError(
            f"{path} was saved for another model ({_shape_line(saved)}; config {saved['config_sha256'][:12]}) "
            f"but this model is {_shape_line(here)} (config {here['config_sha256'][:12]}); "
            "load it with the model it was compressed with, or recompress"
        )
    if saved["dtype"] != here["dtype"]:
        raise ContextFileError(
            f"{path} holds a cache computed in {saved['dtype']} but the model runs in {here['dtype']}: load the "
            f"model with dtype={saved['dtype']} (its logits would differ otherwise), or recompress"
        )
    if saved["weights_sha256"] != here["weights_sha256"]:
        raise ContextFileError(
            f"{path} was saved for a model with the same architecture but different weights (another checkpoint); "
            "load it with the checkpoint it was compressed with, or recompress"
        )


@dataclass
class SavedContext:
    """The parts of a saved context, checked against the model (see :func:`read_context`)."""

    cache: ChunkKVCache
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    next_logits: torch.Tensor
    method: Method
    stats: dict[str, Any]


def read_context(path: str | os.PathLike, model: torch.nn.Module) -> SavedContext:
    """Read a context file written by :func:`write_context` for ``model`` (tensors on its device).

    Raises :class:`ContextFileError` when the file is not a chunkkv context, is damaged (header or
    tensors), or was saved for another model, dtype or checkpoint.
    """
    path = Path(path)
    device = next(model.parameters()).device
    meta, tensors = _read(path, device)
    try:
        _check_model(path, meta["model"], model)
        return _rebuild(path, meta, tensors, model)
    except ContextFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        # the checksums held, so only a file written by hand (or by a buggy writer) gets here
        raise ContextFileError(f"{path}: the chunkkv metadata is malformed ({type(exc).__name__}: {exc})") from None


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ContextFileError(f"{path}: the chunkkv metadata is malformed ({what})")


def _rebuild(path: Path, meta: dict, tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> SavedContext:
    for alias, name in meta.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    input_ids, mask, logits = tensors["input_ids"], tensors["attention_mask"], tensors["next_logits"]
    _need(input_ids.dim() == 2 and mask.shape == input_ids.shape and logits.dim() == 2
          and logits.shape[0] == input_ids.shape[0], path, "prompt tensors of inconsistent shapes")
    batch = input_ids.shape[0]
    fp = meta["model"]
    cache = ChunkKVCache(model.config)
    if len(cache.layers) != len(meta["layers"]):
        raise ContextFileError(f"{path} has {len(meta['layers'])} cache layers, this model {len(cache.layers)}")
    for i, (layer, entry) in enumerate(zip(cache.layers, meta["layers"])):
        kind = "pruned" if isinstance(layer, PrunedLayer) else ("sliding" if isinstance(layer, DynamicSlidingWindowLayer) else "dynamic")
        if kind == "sliding" and entry["kind"] == "pruned" and entry.get("sliding_window") == layer.sliding_window:
            # a sliding-window layer whose window held the prompt was pruned (see ChunkKVCache)
            layer = cache.layers[i] = PrunedLayer(sliding_window=layer.sliding_window)
            kind = "pruned"
        if kind != entry["kind"]:
            raise ContextFileError(f"{path}: layer {i} was saved as a {entry['kind']} layer, this model's is {kind}")
        _need(isinstance(entry["initialized"], bool), path, f"layer {i}: 'initialized' is not true/false")
        stored = 0
        if entry["initialized"]:
            keys, values = tensors[f"layer.{i}.keys"], tensors[f"layer.{i}.values"]
            _need(keys.dim() == 4 and values.shape[:3] == keys.shape[:3] and keys.shape[0] == batch
                  and keys.shape[1] == fp["num_key_value_heads"], path, f"layer {i}: keys/values of another shape")
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            stored = keys.shape[2]
        if kind == "pruned":
            logical = entry["logical_length"]
            _need(isinstance(logical, int) and not isinstance(logical, bool) and logical >= stored, path,
                  f"layer {i}: logical_length {logical!r} is not a length of at least its {stored} stored tokens")
            _need(isinstance(entry["needs_wrapper"], bool), path, f"layer {i}: 'needs_wrapper' is not true/false")
            layer.logical_length = logical
            layer.needs_wrapper = entry["needs_wrapper"]
            layer.valid = tensors.get(f"layer.{i}.valid")
            layer.kept_index = tensors.get(f"layer.{i}.kept_index")
            layer.recent_queries = tensors.get(f"layer.{i}.recent_queries")
            if layer.valid is not None:
                _need(layer.valid.shape == (batch, stored), path, f"layer {i}: a filler mask of another shape")
            if layer.kept_index is not None:
                _need(layer.kept_index.dim() == 3 and layer.kept_index.shape[-1] <= stored
                      and bool((layer.kept_index < max(1, logical)).all()), path, f"layer {i}: kept positions out of range")
        elif kind == "sliding":
            _need(isinstance(entry["cumulative_length"], int), path, f"layer {i}: cumulative_length is not a length")
            layer.cumulative_length = entry["cumulative_length"]
    method = _method_from_json(meta["method"], path)
    budget = meta.get("decode_budget")
    if budget is not None:
        cache.set_decode_budget(_method_from_json(budget["method"], path), budget["keep"], budget["every"])
    stats = dict(meta["stats"])
    stats["kept"] = {int(k): v for k, v in stats["kept"].items()}
    return SavedContext(cache, input_ids, mask, logits, method, stats)
