#!/usr/bin/env python
"""Dump the exact KV positions that NVIDIA kvpress 0.5.5 keeps, as a reference for chunkkv.

This script runs *inside the pinned kvpress environment* (see ``tools/kvpress_env.sh``:
torch 2.13.0, kvpress 0.5.5, transformers 5.2.0). It is deliberately self-contained and
never imports ``chunkkv``.

For every case it performs one prefill of ``model.model`` (the decoder without the LM head,
exactly as ``KVPressTextGenerationPipeline`` does) with a kvpress press active, and recovers,
for each layer ``l`` and KV head ``h``, the sorted list of ORIGINAL token positions that
survived compression.

Recovery is black-box: the same input is also prefilled without any press, and every key row
left in the compressed cache is matched to the unique position of the full cache holding the
identical key vector (bitwise equality; ``allclose`` with ``--atol`` as fallback). This is
sound because kvpress compresses inside a *post*-attention forward hook: every layer's
attention during prefill still sees the full cache, so the hidden states -- and hence the full
keys of every layer -- are bitwise identical with and without the press. The value rows at the
matched positions are checked as well. Any kept row that cannot be matched to exactly one
position aborts the run (exit status 3).

cases.json is a list of objects::

    {"name": "c1", "input_ids": [[1, 2, ...]],           # batch of exactly one sequence
     "press": "chunkkv" | "snapkv" | "streamingllm" | "pyramidkv",
     "compression_ratio": 0.5,                           # kvpress meaning: fraction REMOVED
     "window_size": 32, "kernel_size": 5,                 # snapkv / chunkkv / pyramidkv
     "chunk_length": 20,                                  # chunkkv only
     "n_sink": 4,                                         # streamingllm only
     "beta": 20}                                          # pyramidkv only (optional)

Missing optional parameters take kvpress's dataclass defaults (window_size=64, kernel_size=5,
chunk_length=20, n_sink=4, beta=20); the press actually built is echoed as ``press_repr``.
"chunkkv" is ``ChunkKVPress(press=SnapKVPress(r, window_size, kernel_size), chunk_length)``.

Output JSON::

    {"kvpress_version", "transformers_version", "torch_version", "attn_implementation",
     "device", "dtype", "num_threads",
     "cases": [{"name", "press", "press_repr", "seq_len", "num_layers", "num_kv_heads",
                "kept": [[[idx, ...] per kv head] per layer],      # sorted original positions
                "kept_len_per_layer": [int per layer],
                "cache_order_sorted_per_layer": [bool per layer], # was the cache itself in
                                                                  # position order?
                # only with --timing-repeats N > 0:
                "timing": {"repeats", "prefill_ms_no_press", "prefill_ms_with_press",
                           "overhead_ms", "compress_ms_per_layer", "compress_ms_total",
                           "compress_ms_samples"},
                # only with --decode-steps N > 0 (greedy decoding after the compressed prefill,
                # the way KVPressTextGenerationPipeline does it; the same without any press):
                "decode": {"steps", "warmup", "ms_per_token", "ms_per_token_min",
                           "ms_per_token_max", "samples_ms", "cache_len_per_layer"},
                "decode_no_press": {...same keys...}}]}

With ``--timing-only`` the black-box recovery is skipped (no ``kept`` and no
``cache_order_sorted_per_layer``; ``kept_len_per_layer`` is read from the compressed cache):
this is what ``chunkkv bench`` uses to time kvpress side by side with chunkkv.

With ``--keep-going`` a case whose press raises (e.g. kvpress's assertion that the sequence
is longer than ``window_size``) is recorded as ``{"name", "press", "error": "..."}`` and the
run continues; key-matching failures are always fatal.

Example::

    KVPY="$(tools/kvpress_env.sh | tail -n 1)"
    "$KVPY" tools/kvpress_reference.py --model /tmp/kvref_model \\
        --cases cases.json --out ref.json --timing-repeats 5

Timing uses ``time.perf_counter`` (with ``torch.cuda.synchronize`` on GPU), one warm-up and
the median of N runs. The prefill without press is timed once per distinct input (cases that
share an input share that number). ``--dtype`` loads the model in another dtype (default float32);
``--device cuda`` needs a CUDA build of torch in this environment. The thread count is ``--threads`` or, if omitted, the environment
variable ``KVREF_NUM_THREADS`` / ``OMP_NUM_THREADS``; otherwise torch's default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; never touch the hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel  # noqa: E402

# Importing kvpress also patches transformers' attention functions, exactly as in real use.
from kvpress import (  # noqa: E402
    BasePress,
    ChunkKVPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
)

PRESS_KINDS = ("chunkkv", "snapkv", "streamingllm", "pyramidkv")


class KeyMatchError(RuntimeError):
    """A kept KV row could not be matched to exactly one original position."""


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------


def _load_safetensors_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Read every ``*.safetensors`` file in ``model_dir`` into one state dict."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _state_dict_matches(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> list[str]:
    """Return the names of saved tensors that are missing from, or differ in, ``model``."""
    params = model.state_dict()
    bad = []
    for name, saved in state.items():
        mine = params.get(name)
        if mine is None or mine.shape != saved.shape or not torch.equal(mine.cpu(), saved.to(mine.dtype)):
            bad.append(name)
    return bad


def load_model(model_dir: Path, attn_implementation: str, device: str,
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a saved causal LM (float32 unless ``dtype``) and verify its weights against the files.

    Models saved by a newer transformers (e.g. 5.24 in the main venv) load fine in 5.2.0 for
    Llama. Should ``from_pretrained`` fail or load different weights (config drift across
    versions), fall back to instantiating the architecture from ``config.json`` in *this*
    transformers and loading the saved state dict strictly.
    """
    state = _load_safetensors_state_dict(model_dir)
    model: PreTrainedModel | None = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation=attn_implementation
        )
        bad = _state_dict_matches(model, state)
        if bad:
            print(f"[kvpress_reference] from_pretrained weights differ ({bad[:3]}...); "
                  "falling back to config + state dict", file=sys.stderr)
            model = None
    except Exception as exc:  # noqa: BLE001 - any load failure triggers the documented fallback
        print(f"[kvpress_reference] from_pretrained failed ({exc!r}); "
              "falling back to config + state dict", file=sys.stderr)
    if model is None:
        config = AutoConfig.from_pretrained(str(model_dir))
        config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attn_implementation)
        # tie_word_embeddings models may omit lm_head.weight from the file; strict otherwise.
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model = model.to(device=device, dtype=dtype).eval()
    if model.config._attn_implementation != attn_implementation:
        raise RuntimeError(f"attn_implementation is {model.config._attn_implementation!r}, "
                           f"wanted {attn_implementation!r}")
    return model


# --------------------------------------------------------------------------------------------
# Presses and prefill
# --------------------------------------------------------------------------------------------


def build_press(case: dict[str, Any]) -> BasePress:
    """Instantiate the kvpress press described by one case."""
    kind = case["press"]
    ratio = float(case["compression_ratio"])
    snap_kw: dict[str, Any] = {k: int(case[k]) for k in ("window_size", "kernel_size") if k in case}
    if kind == "chunkkv":
        extra = {"chunk_length": int(case["chunk_length"])} if "chunk_length" in case else {}
        return ChunkKVPress(press=SnapKVPress(compression_ratio=ratio, **snap_kw), **extra)
    if kind == "snapkv":
        return SnapKVPress(compression_ratio=ratio, **snap_kw)
    if kind == "pyramidkv":
        extra = {"beta": int(case["beta"])} if "beta" in case else {}
        return PyramidKVPress(compression_ratio=ratio, **snap_kw, **extra)
    if kind == "streamingllm":
        extra = {"n_sink": int(case["n_sink"])} if "n_sink" in case else {}
        return StreamingLLMPress(compression_ratio=ratio, **extra)
    raise ValueError(f"unknown press {kind!r}; expected one of {PRESS_KINDS}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, press: BasePress | None) -> DynamicCache:
    """One prefill of the decoder (no LM head), with ``press`` hooked in if given.

    This mirrors ``KVPressTextGenerationPipeline._forward`` in kvpress 0.5.5:
    ``with press(model): model.model(input_ids=..., past_key_values=DynamicCache())``.
    No attention mask is passed (kvpress ignores masks/padding anyway).
    """
    cache = DynamicCache()
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with ctx:
        model.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    return cache


def layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one cache layer, shape (batch, kv_heads, seq, head_dim)."""
    lay = cache.layers[layer]
    return lay.keys, lay.values


# --------------------------------------------------------------------------------------------
# Black-box recovery of kept positions
# --------------------------------------------------------------------------------------------


def match_rows(kept: torch.Tensor, full: torch.Tensor, atol: float, where: str) -> list[int]:
    """Map each row of ``kept`` (n, d) to the unique row index of ``full`` (T, d) it equals.

    Exact (bitwise) equality is tried first via a hash table of row bytes; rows without an
    exact hit fall back to ``max|kept - full| <= atol``. Raises ``KeyMatchError`` if a row
    matches zero or several positions.
    """
    full_np = full.detach().cpu().contiguous().numpy()
    kept_np = kept.detach().cpu().contiguous().numpy()
    table: dict[bytes, list[int]] = {}
    for t in range(full_np.shape[0]):
        table.setdefault(full_np[t].tobytes(), []).append(t)

    out: list[int] = []
    full_cpu = full.detach().cpu()
    for i in range(kept_np.shape[0]):
        hits = table.get(kept_np[i].tobytes(), [])
        if not hits:
            diff = (full_cpu - kept.detach().cpu()[i]).abs().amax(dim=-1)
            hits = torch.nonzero(diff <= atol).flatten().tolist()
        if len(hits) != 1:
            raise KeyMatchError(f"{where}: kept row {i} matches {len(hits)} original positions "
                                f"{hits[:10]} (need exactly 1)")
        out.append(hits[0])
    return out


def recover_kept(full: DynamicCache, pressed: DynamicCache, num_layers: int,
                 atol: float, case_name: str) -> tuple[list[list[list[int]]], list[int], list[bool]]:
    """Recover kept original positions for every (layer, kv head) of a batch-1 prefill.

    Returns (kept[layer][head] sorted, kept_len_per_layer, cache_order_sorted_per_layer).
    """
    kept_all: list[list[list[int]]] = []
    lens: list[int] = []
    order_sorted: list[bool] = []
    for layer in range(num_layers):
        fk, fv = layer_kv(full, layer)
        pk, pv = layer_kv(pressed, layer)
        if pk.shape[0] != 1 or fk.shape[0] != 1:
            raise KeyMatchError(f"{case_name} layer {layer}: expected batch 1, got {tuple(pk.shape)}")
        heads: list[list[int]] = []
        is_sorted = True
        for h in range(pk.shape[1]):
            where = f"case {case_name!r} layer {layer} head {h}"
            idx = match_rows(pk[0, h], fk[0, h], atol, where)
            if len(set(idx)) != len(idx):
                raise KeyMatchError(f"{where}: the same position was kept twice")
            # The values must come from the very same positions.
            vdiff = (pv[0, h].cpu() - fv[0, h].cpu()[torch.tensor(idx, dtype=torch.long)]).abs()
            if vdiff.numel() and float(vdiff.max()) > atol:
                raise KeyMatchError(f"{where}: values at matched positions differ "
                                    f"(max |diff| = {float(vdiff.max()):.3g})")
            is_sorted &= idx == sorted(idx)
            heads.append(sorted(idx))
        kept_all.append(heads)
        lens.append(int(pk.shape[2]))
        order_sorted.append(bool(is_sorted))
    return kept_all, lens, order_sorted


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class CompressTimer:
    """Wraps ``press.compress`` (instance attribute shadows the method) to time each layer."""

    press: BasePress
    device: torch.device

    def __post_init__(self) -> None:
        self.per_layer: dict[int, list[float]] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        original: Callable[..., Any] = self.press.compress

        def timed(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            t0 = time.perf_counter()
            out = original(module, *args, **kwargs)
            _sync(self.device)
            self.per_layer.setdefault(int(module.layer_idx), []).append((time.perf_counter() - t0) * 1e3)
            return out

        self.press.compress = timed  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self.press.compress  # restore the class method


def _time_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median wall time in ms of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


_NO_PRESS_MS: dict[tuple[int, int], float] = {}


def _input_key(input_ids: torch.Tensor) -> int:
    return hash(tuple(input_ids.flatten().tolist()))


def time_case(model: PreTrainedModel, input_ids: torch.Tensor, press: BasePress,
              repeats: int, num_layers: int) -> dict[str, Any]:
    """Median prefill time with/without the press, and per-layer ``compress`` time."""
    device = input_ids.device
    key = (_input_key(input_ids), repeats)
    if key not in _NO_PRESS_MS:
        _NO_PRESS_MS[key] = _time_ms(lambda: prefill(model, input_ids, None), repeats, device)
    no_press = _NO_PRESS_MS[key]
    timer = CompressTimer(press, device)
    with timer.active():
        with_press = _time_ms(lambda: prefill(model, input_ids, press), repeats, device)
    # drop the warm-up call of each layer, keep the median of the timed ones
    per_layer = []
    runs: list[list[float]] = []
    for layer in range(num_layers):
        samples = timer.per_layer.get(layer, [])[1:]
        if not samples:
            raise RuntimeError(f"press.compress was never timed for layer {layer}")
        per_layer.append(statistics.median(samples))
        runs.append(samples)
    return {
        "repeats": repeats,
        "prefill_ms_no_press": no_press,
        "prefill_ms_with_press": with_press,
        "overhead_ms": with_press - no_press,
        "compress_ms_per_layer": per_layer,
        "compress_ms_total": sum(per_layer),
        # total over layers of each timed run (same order as the runs)
        "compress_ms_samples": [sum(run[i] for run in runs) for i in range(min(len(r) for r in runs))],
    }


_NO_PRESS_DECODE: dict[tuple[int, int, int], dict[str, Any]] = {}


@torch.inference_mode()
def time_decode(model: PreTrainedModel, input_ids: torch.Tensor, press: BasePress | None,
                steps: int, warmup: int) -> dict[str, Any]:
    """Greedy decoding after a (compressed) prefill, timed per token.

    Mirrors ``KVPressTextGenerationPipeline`` in kvpress 0.5.5: the press is active only during
    the context prefill of ``model.model``; then a one-token "question" (the prompt's last token)
    and ``warmup + steps`` greedy tokens are decoded with ``model(...)`` over the compressed
    cache, ``position_ids`` continuing the original context length, one ``.item()`` per token.
    """
    device = input_ids.device
    num_layers = model.config.num_hidden_layers
    cache = prefill(model, input_ids, press)
    kept = [int(layer_kv(cache, layer)[0].shape[2]) for layer in range(num_layers)]
    context_length = input_ids.shape[1]
    position_ids = torch.arange(context_length, context_length + 1, device=device).unsqueeze(0)
    out = model(input_ids=input_ids[:, -1:], past_key_values=cache, position_ids=position_ids, logits_to_keep=1)
    token = out.logits[0, -1].argmax()
    samples: list[float] = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=position_ids + 1 + i)
        token = out.logits[0, -1].argmax()
        token.item()  # the pipeline's per-token stop check
        _sync(device)
        if i >= warmup:
            samples.append((time.perf_counter() - t0) * 1e3)
    return {
        "steps": steps,
        "warmup": warmup,
        "ms_per_token": statistics.median(samples),
        "ms_per_token_min": min(samples),
        "ms_per_token_max": max(samples),
        "samples_ms": samples,
        "cache_len_per_layer": kept,
    }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_case(model: PreTrainedModel, case: dict[str, Any], device: torch.device,
             atol: float, timing_repeats: int, *, timing_only: bool = False,
             decode_steps: int = 0, decode_warmup: int = 2) -> dict[str, Any]:
    """Run one case and return its JSON record."""
    name = str(case["name"])
    if case.get("press") not in PRESS_KINDS:
        raise ValueError(f"case {name!r}: press must be one of {PRESS_KINDS}, got {case.get('press')!r}")
    ids = case["input_ids"]
    if not (isinstance(ids, list) and len(ids) == 1 and isinstance(ids[0], list)):
        raise ValueError(f"case {name!r}: input_ids must be a batch of exactly one list of ids")
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"case {name!r}: token ids must lie in [0, {vocab})")

    num_layers = model.config.num_hidden_layers
    press = build_press(case)
    pressed = prefill(model, input_ids, press)
    record: dict[str, Any] = {
        "name": name,
        "press": case["press"],
        "press_repr": repr(press),
        "seq_len": int(input_ids.shape[1]),
        "num_layers": num_layers,
        "num_kv_heads": int(layer_kv(pressed, 0)[0].shape[1]),
    }
    if timing_only:
        record["kept_len_per_layer"] = [int(layer_kv(pressed, layer)[0].shape[2]) for layer in range(num_layers)]
    else:
        full = prefill(model, input_ids, None)
        kept, lens, order_sorted = recover_kept(full, pressed, num_layers, atol, name)
        del full
        record.update(kept=kept, kept_len_per_layer=lens, cache_order_sorted_per_layer=order_sorted)
    del pressed
    if timing_repeats > 0:
        record["timing"] = time_case(model, input_ids, press, timing_repeats, num_layers)
    if decode_steps > 0:
        record["decode"] = time_decode(model, input_ids, press, decode_steps, decode_warmup)
        key = (_input_key(input_ids), decode_steps, decode_warmup)
        if key not in _NO_PRESS_DECODE:
            _NO_PRESS_DECODE[key] = time_decode(model, input_ids, None, decode_steps, decode_warmup)
        record["decode_no_press"] = _NO_PRESS_DECODE[key]
    return record


def _resolve_threads(cli: int | None) -> int | None:
    if cli is not None:
        return cli
    for var in ("KVREF_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").strip().isdigit():
            return int(os.environ[var])
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="saved HF causal LM folder (safetensors)")
    p.add_argument("--cases", type=Path, required=True, help="cases JSON (list of objects)")
    p.add_argument("--out", type=Path, required=True, help="output JSON")
    p.add_argument("--timing-repeats", type=int, default=0,
                   help="N > 0: also time prefill with/without press (median of N after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: $KVREF_NUM_THREADS or $OMP_NUM_THREADS)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in (default: float32)")
    p.add_argument("--timing-only", action="store_true",
                   help="skip the black-box recovery of kept positions (no 'kept' in the output)")
    p.add_argument("--decode-steps", type=int, default=0,
                   help="N > 0: also time N greedy decode tokens after the compressed prefill "
                        "(pipeline-style) and without press")
    p.add_argument("--decode-warmup", type=int, default=2,
                   help="untimed decode tokens before the timed ones (default 2)")
    p.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"),
                   help="sdpa (default). eager makes ChunkKVPress assert and changes SnapKV numerics")
    p.add_argument("--atol", type=float, default=1e-6, help="fallback tolerance for key matching")
    p.add_argument("--keep-going", action="store_true",
                   help="record a press error for a case and continue instead of aborting")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    threads = _resolve_threads(args.threads)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)

    cases = json.loads(args.cases.read_text())
    if not isinstance(cases, list):
        raise SystemExit("--cases must hold a JSON list of case objects")
    names = [c.get("name") for c in cases]
    if len(set(names)) != len(names):
        raise SystemExit("case names must be unique")

    t_start = time.perf_counter()
    model = load_model(args.model, args.attn_implementation, args.device, getattr(torch, args.dtype))
    results: list[dict[str, Any]] = []
    for case in cases:
        t0 = time.perf_counter()
        try:
            rec = run_case(model, case, device, args.atol, args.timing_repeats, timing_only=args.timing_only,
                           decode_steps=args.decode_steps, decode_warmup=args.decode_warmup)
        except KeyMatchError as exc:
            print(f"[kvpress_reference] FATAL key matching failure: {exc}", file=sys.stderr)
            return 3
        except Exception as exc:  # noqa: BLE001
            if not args.keep_going:
                raise
            print(f"[kvpress_reference] {case.get('name')}: press raised "
                  f"{''.join(traceback.format_exception_only(exc)).strip()}", file=sys.stderr)
            rec = {"name": case.get("name"), "press": case.get("press"),
                   "error": f"{type(exc).__name__}: {exc}"}
        results.append(rec)
        status = "error" if "error" in rec else f"kept_len_per_layer={rec['kept_len_per_layer']}"
        print(f"[kvpress_reference] {case.get('name')}: {status} ({time.perf_counter() - t0:.2f}s)",
              file=sys.stderr)

    out = {
        "kvpress_version": pkg_version("kvpress"),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "attn_implementation": model.config._attn_implementation,
        "device": str(device),
        "dtype": args.dtype,
        "num_threads": torch.get_num_threads(),
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"[kvpress_reference] wrote {args.out} ({len(results)} cases, "
          f"{time.perf_counter() - t_start:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
