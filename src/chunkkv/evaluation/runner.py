"""Run a benchmark: answer every sample on a compressed cache, score it, write it, summarise.

``run_eval`` is the Python API behind ``chunkkv eval``::

    from chunkkv.evaluation import run_eval
    metrics = run_eval(model, tokenizer, task="longbench:qasper", out_dir="runs/qasper-chunkkv",
                       method=chunkkv.ChunkKV(keep_fraction=0.1, reuse_depth=2), limit=20)

Each sample is answered alone (batch 1): the context is compressed with :func:`chunkkv.compress`,
the question is appended with :func:`chunkkv.extend`, and :func:`chunkkv.continue_from` decodes
(greedy unless ``do_sample``). With ``query_aware=True`` the whole prompt is compressed and decoding
starts from its last logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..capture import PrefillCapture
from ..chunk_scoring import run_in_chunks
from ..pipeline import compress, compress_from_capture, prefill
from ..errors import ChunkKVError
from ..generation import Sampling, continue_from, extend, set_decode_budget
from ..methods import FullKV, Method, StreamingLLM
from ..outputs import (
    LOCK_NAME, OutputLock, check_output_dir, check_settings, incomplete_line, refuse_other_settings,
)
from ..prompt import position_limit
from .base import EvalSample, Task, mean
from .config import EvalConfig, describe_method
from .distributed import Shard
from ..prompting import chat_template_available, encode_prompt
from .store import RecordStore, write_json_atomic, write_text_atomic
from .tasks import build_task

__all__ = ["EvalConfig", "Generator", "SharedPrefill", "merge_results", "output_locks", "preload_check", "run_eval",
           "run_eval_many"]

def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class SharedPrefill:
    """One prefill per context for several methods answering the same samples
    (:func:`chunkkv.pipeline.prefill`).

    Holds the capture of the last context it saw; a method asking for the same context gets its
    compressed cache built from that capture (exactly what ``compress`` would give, scoring passes
    included) instead of a new prefill.
    """

    def __init__(self, methods: list[Method | None]) -> None:
        self.methods = [m for m in methods if m is not None]
        self._key: tuple | None = None
        self._capture: PrefillCapture | None = None
        self.prefills = 0

    def context(self, model: torch.nn.Module, context_ids: list[int], method: Method, device, tokenizer=None,
                chat_template: bool | None = None):
        key = (tuple(context_ids), chat_template)
        if key != self._key:
            self._key, self._capture = None, None  # free the previous capture before the next prefill
            self._capture = prefill(model, torch.tensor([context_ids], device=device), methods=self.methods,
                                    tokenizer=tokenizer, chat_template=chat_template)
            self._key = key
            self.prefills += 1
        return compress_from_capture(self._capture, method)


class Generator:
    """Answers one :class:`EvalSample` on a compressed cache (batch 1).

    With ``shared`` (a :class:`SharedPrefill`), the compressed context comes from a prefill shared
    with other methods on the same sample (one-shot prefill only; ``prefill_chunk`` compresses alone).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, method: Method | None, config: EvalConfig,
                 shared: SharedPrefill | None = None) -> None:
        self.model, self.tokenizer, self.method, self.config = model, tokenizer, method, config
        self.shared = shared
        if config.chat_template and not chat_template_available(tokenizer):
            raise ChunkKVError("--chat-template was given but the tokenizer has no chat template")
        self.use_chat = chat_template_available(tokenizer) if config.chat_template is None else config.chat_template
        eos = _as_list(tokenizer.eos_token_id) + _as_list(getattr(model.generation_config, "eos_token_id", None))
        self.eos = list(dict.fromkeys(eos))
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        self.newline_id = newline[-1] if newline else None
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.device = model.get_input_embeddings().weight.device
        self._last: tuple[tuple[int, ...], Any] | None = None

    def _compressed(self, context_ids: list[int], keep: bool, chat: bool):
        """The compressed context. With ``keep`` it is also held (and forked) for the next sample,
        which has the same context (GSM8K's exemplars): compression is deterministic, so reusing
        it gives the same answers. Only one context is held, and only when it will be reused (a
        held context and its growing fork would otherwise both stay in memory while decoding).

        A context no longer than the method's observation window cannot be scored; it is kept
        whole (the record says ``"compressed": false``) rather than stopping the run.
        """
        key = tuple(context_ids)
        held = self._last
        self._last = None  # free the previous context before the next prefill
        if held is not None and held[0] == key:
            base = held[1]
        else:
            held = None
            method = FullKV() if self._too_short(len(context_ids)) else self.method
            chunk = self.config.prefill_chunk if method is self.method else None
            if self.shared is not None and chunk is None:
                base = self.shared.context(self.model, context_ids, method or FullKV(), self.device, self.tokenizer,
                                           chat)
            else:
                base = compress(self.model, torch.tensor([context_ids], device=self.device), method=method,
                                prefill_chunk=chunk, tokenizer=self.tokenizer, chat_template=chat)
        if not keep:
            return base
        self._last = (key, base)
        return base.fork()

    def _too_short(self, n: int) -> bool:
        method = self.method
        return method is not None and not isinstance(method, (FullKV, StreamingLLM)) and n <= method.window

    @torch.inference_mode()
    def __call__(self, sample: EvalSample, seed: int | None = None, reuse_next: bool = False) -> dict[str, Any]:
        """Generate for one sample: ``{"prediction", "chat", "compressed", "prompt_tokens", "context_tokens",
        "kept_tokens", "generated_tokens", "seconds"}`` (``kept_tokens``: mean over the pruned
        layers; the context's length when nothing was pruned). ``reuse_next``: the next sample has
        the same context, so its compressed cache is kept for it."""
        start = time.perf_counter()
        use_chat = self.use_chat and sample.chat
        enc = encode_prompt(
            self.tokenizer, sample.context, sample.question, use_chat, self.config.system_prompt,
            self.config.chat_template_kwargs,
        )
        if self.config.query_aware or not sample.context.strip() or not enc.context_ids:
            context_ids, question_ids = enc.full_ids, []
        else:
            context_ids, question_ids = enc.context_ids, enc.question_ids
        stops = list(self.eos)
        if sample.stop_newline and self.newline_id is not None:
            stops.append(self.newline_id)
        max_new = self.config.max_new_tokens or sample.max_new_tokens
        sampling = Sampling(
            max_new_tokens=max_new, do_sample=self.config.do_sample, temperature=self.config.temperature,
            top_p=self.config.top_p, seed=seed if self.config.do_sample else None,
            eos_token_id=stops or None, pad_token_id=self.pad,
        )
        ctx = self._compressed(context_ids, keep=reuse_next and not self.config.query_aware, chat=use_chat)
        if self.config.decode_budget is not None and self.method is not None:
            set_decode_budget(ctx, self.config.decode_budget, self.config.compress_every, self.method)
        if question_ids:
            extend(self.model, ctx, torch.tensor([question_ids], device=self.device))
        if sample.min_new_tokens > 0 and stops:
            logits = ctx.next_logits.clone()
            logits[:, stops] = float("-inf")  # the first token may not end the answer
            ctx.next_logits = logits
        tokens = continue_from(self.model, ctx, None, sampling)[0].tolist()
        if stops:
            for i, t in enumerate(tokens):
                if t in stops:
                    tokens = tokens[:i]
                    break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in sample.stop_strings:
            if stop in text:
                text = text[: text.index(stop)]
        kept = [row[0] for row in ctx.stats.kept.values()]
        return {
            "prediction": text,
            "chat": use_chat,
            "compressed": not self._too_short(len(context_ids)),
            "prompt_tokens": len(context_ids) + len(question_ids),
            "context_tokens": len(context_ids),
            "kept_tokens": round(mean([float(k) for k in kept]), 2) if kept else float(len(context_ids)),
            "generated_tokens": len(tokens),
            "seconds": round(time.perf_counter() - start, 4),
        }


def _check_run_file(out: Path, fingerprint: dict[str, Any], expected: int | None = None,
                    flags: dict[str, Any] | None = None, limit: int | None = None, ids: list[str] | None = None) -> None:
    """Refuse to resume a folder written with other settings; record ours (the rule every resumable
    store follows: :func:`chunkkv.outputs.check_settings`), and, for :func:`preload_check`, the
    settings as the flags gave them, the ``--limit`` and a digest of the sample ids."""
    extra = None if flags is None else {"flags": flags, "limit": limit, "ids": _ids_digest(ids or [])}
    check_settings(out, fingerprint, expected=expected, extra=extra)


def _ids_digest(ids) -> str:
    return hashlib.sha256("\n".join(sorted(set(map(str, ids)))).encode()).hexdigest()


def preload_check(config: EvalConfig, method: Method | None, shard: Shard | None = None) -> dict[str, Any] | None:
    """Before the model loads: compare ``config`` and the method *as the flags give it* with the run
    that wrote ``config.out_dir`` (refused with the same message as after loading when they differ),
    and return that run's metrics when it is finished with these settings and the same ``limit``
    (nothing left to answer: the caller prints them without loading the model). None: run.

    Folders written before this check (no ``flags`` in ``run.json``) are compared after loading, as before.
    """
    path = Path(config.out_dir) / "run.json"
    if config.overwrite or not path.exists():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict) or "flags" not in saved:
        return None
    flags = config.fingerprint(method)
    if saved["flags"] != flags:
        refuse_other_settings(config.out_dir, saved["flags"], flags)
    if (shard is not None and shard.world > 1) or saved.get("limit") != config.limit:
        return None
    try:
        metrics = json.loads((Path(config.out_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    expected = saved.get("expected")
    if not (expected is not None and metrics.get("complete") and metrics.get("expected") == expected):
        return None
    # Every sample of the run has a record, and nothing else does (an interrupted write, a record
    # added by a run with another --limit: a run with the model sorts it out).
    done = RecordStore(config.out_dir).load()
    return metrics if _ids_digest(done) == saved.get("ids") else None


def _check_lengths(config: EvalConfig, model: torch.nn.Module) -> None:
    """Refuse context lengths the model has no positions for, before any sample runs."""
    limit = position_limit(getattr(model, "config", None))
    if limit is not None and config.lengths and max(config.lengths) > limit:
        raise ChunkKVError(f"--lengths {max(config.lengths)} is longer than the model's {limit} positions "
                           "(max_position_embeddings): its answers there would be garbage; give lengths within them")


def _wait_for(store: RecordStore, ids: list[str], log_every: float = 300.0) -> None:
    """Block until every id has a record in some file of the folder (other ranks' shards)."""
    interval = float(os.environ.get("CHUNKKV_EVAL_POLL_SECONDS", "10"))
    wanted = set(ids)
    last_log = time.monotonic()
    while True:
        missing = wanted - set(store.load())
        if not missing:
            return
        if time.monotonic() - last_log > log_every:
            print(f"chunkkv eval: rank 0 waits for {len(missing)} samples of other ranks", file=sys.stderr)
            last_log = time.monotonic()
        time.sleep(interval)


@contextlib.contextmanager
def output_locks(out_dir: str | Path, shard: Shard | None = None) -> Iterator[OutputLock]:
    """Hold ``out_dir`` for this run (see :mod:`chunkkv.outputs`); yields the folder lock.

    One process: the folder lock, exclusive. A sharded run: the folder lock shared by its ranks
    and this rank's own lock exclusive (a second run's rank ``r`` is refused); rank 0 upgrades
    the folder lock before merging. Raises :class:`~chunkkv.outputs.OutputBusyError` at once when
    another run holds the folder.
    """
    shard = shard or Shard()
    check_output_dir(out_dir)
    what = f"--out {out_dir}"
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(OutputLock(out_dir, shared=shard.world > 1, what=what))
        if shard.world > 1:
            stack.enter_context(OutputLock(out_dir, name=f"{LOCK_NAME}.rank{shard.rank}",
                                           what=f"{what} (rank {shard.rank})"))
        yield folder


def run_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    config: EvalConfig | None = None,
    *,
    method: Method | None = None,
    shard: Shard | None = None,
    flags_method: Method | None = None,
    **fields: Any,
) -> dict[str, Any] | None:
    """Evaluate ``model`` with ``method`` on ``config.task`` and write the results to ``config.out_dir``.

    Pass an :class:`EvalConfig` or its fields as keywords (``task=…, out_dir=…``). Finished samples
    already in the folder are skipped (resume). With a ``shard`` of ``world > 1`` this process
    answers samples ``i`` with ``i % world == rank``; rank 0 then waits for the other ranks'
    records and merges.

    ``flags_method``: the method as the command's flags gave it, before
    :func:`chunkkv.cli_common.method_as_run` (recorded for :func:`preload_check`).

    Returns the metrics (also in ``metrics.json``), or None on ranks other than 0.
    """
    if config is None:
        config = EvalConfig(**fields)
    elif fields:
        config = dataclasses.replace(config, **fields)
    shard = shard or Shard()
    if not config.model_name:
        config.model_name = str(getattr(model, "name_or_path", "") or "")
    if config.model_max_positions is None:
        config.model_max_positions = getattr(model.config, "max_position_embeddings", None)
    _check_lengths(config, model)
    task = build_task(config)
    with output_locks(config.out_dir, shard) as lock:
        store = RecordStore(config.out_dir, shard.rank, shard.world)
        if config.overwrite:
            if shard.world > 1:
                raise ChunkKVError("--overwrite cannot be used in a sharded run: delete the output folder first")
            store.reset()
        samples = task.samples(tokenizer)
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ChunkKVError(f"the task produced duplicate sample ids (e.g. {_first_duplicate(ids)})")
        _check_run_file(store.dir, config.fingerprint(method), len(samples),
                        None if flags_method is None else config.fingerprint(flags_method), config.limit, ids)
        done = store.load()
        todo = [(i, s) for i, s in enumerate(samples) if shard.owns(i) and s.id not in done]
        if todo:
            prepare = getattr(task, "prepare", None)
            if prepare is not None:
                prepare(model, tokenizer)
            generator = Generator(model, tokenizer, method, config)
            with _incomplete_on_error(store, ids, shard):
                _answer_all(task, generator, store, todo, config, shard, len(samples))
        store.close()
        if not shard.is_main:
            return None
        if shard.world > 1:
            _wait_for(store, ids)
            lock.upgrade()  # the other ranks have left: nobody appends while the files are merged
        return finalize(store, task, config, method, order=ids)


def run_eval_many(
    model: torch.nn.Module,
    tokenizer: Any,
    config: EvalConfig,
    methods: dict[str, Method | None],
    *,
    shard: Shard | None = None,
    flags_methods: dict[str, Method | None] | None = None,
) -> dict[str, dict[str, Any] | None]:
    """:func:`run_eval` for several methods on the same samples, one prefill per sample.

    ``methods`` maps a folder name to a method: method ``name`` writes ``<config.out_dir>/<name>/``
    exactly as ``run_eval(..., out_dir=<that folder>, method=...)`` would (same records, same
    resume, same metrics), but each sample's prompt is prefilled once for every method that still
    needs it (:class:`SharedPrefill`; with ``prefill_chunk`` each method compresses alone).
    Returns ``{name: metrics}`` (None on ranks other than 0).
    """
    if not methods:
        raise ChunkKVError("give at least one method")
    bad = [n for n in methods if not n or "/" in n or n in (".", "..")]
    if bad:
        raise ChunkKVError(f"method folder names must be plain names, got {bad[0]!r}")
    shard = shard or Shard()
    if not config.model_name:
        config = dataclasses.replace(config, model_name=str(getattr(model, "name_or_path", "") or ""))
    if config.model_max_positions is None:
        config = dataclasses.replace(config, model_max_positions=getattr(model.config, "max_position_embeddings", None))
    _check_lengths(config, model)
    task = build_task(config)
    configs = {n: dataclasses.replace(config, out_dir=str(Path(config.out_dir) / n)) for n in methods}
    with contextlib.ExitStack() as stack:
        locks = {n: stack.enter_context(output_locks(c.out_dir, shard)) for n, c in configs.items()}
        samples = task.samples(tokenizer)
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ChunkKVError(f"the task produced duplicate sample ids (e.g. {_first_duplicate(ids)})")
        stores, todo = {}, {}
        for n, c in configs.items():
            stores[n] = RecordStore(c.out_dir, shard.rank, shard.world)
            if c.overwrite:
                if shard.world > 1:
                    raise ChunkKVError("--overwrite cannot be used in a sharded run: delete the output folder first")
                stores[n].reset()
            flags = None if flags_methods is None else c.fingerprint(flags_methods[n])
            _check_run_file(stores[n].dir, c.fingerprint(methods[n]), len(samples), flags, c.limit, ids)
            done = stores[n].load()
            todo[n] = {i for i, s in enumerate(samples) if shard.owns(i) and s.id not in done}
        if any(todo.values()):
            prepare = getattr(task, "prepare", None)
            if prepare is not None:
                prepare(model, tokenizer)
            shared = SharedPrefill(list(methods.values()))
            generators = {n: Generator(model, tokenizer, methods[n], configs[n], shared=shared) for n in methods}
            from ..cli_common import track

            wanted = [(i, s) for i, s in enumerate(samples) if any(i in t for t in todo.values())]
            with contextlib.ExitStack() as said:
                for n in methods:
                    said.enter_context(_incomplete_on_error(stores[n], ids, shard))
                for index, sample in track(wanted, f"{config.task} x {len(methods)} methods",
                                           config.progress and shard.local_rank == 0):
                    for n in methods:
                        if index in todo[n]:
                            out = generators[n](sample, seed=config.seed + index)
                            stores[n].append(_record(task, sample, index, out, shard))
        results: dict[str, dict[str, Any] | None] = {}
        for n in methods:
            stores[n].close()
            if not shard.is_main:
                results[n] = None
                continue
            if shard.world > 1:
                _wait_for(stores[n], ids)
                locks[n].upgrade()
            results[n] = finalize(stores[n], task, configs[n], methods[n], order=ids)
        return results


@contextlib.contextmanager
def _incomplete_on_error(store: RecordStore, ids: list[str], shard: Shard) -> Iterator[None]:
    """A run that stops early (interrupted, or an error on some sample) says what it finished."""
    try:
        yield
    except BaseException:
        store.close()
        mine = [i for k, i in enumerate(ids) if shard.owns(k)]
        done = set(store.load())
        extra = " (every rank, for a sharded run)" if shard.world > 1 else ""
        print(incomplete_line(sum(1 for i in mine if i in done), len(mine), "samples", store.dir, extra), flush=True)
        raise


def _answer_all(task: Task, generator: Generator, store: RecordStore, todo: list[tuple[int, EvalSample]],
                config: EvalConfig, shard: Shard, total: int) -> None:
    from ..cli_common import track

    desc = f"{config.task}" + (f" [rank {shard.rank}/{shard.world}]" if shard.world > 1 else "")
    # One bar per machine (local rank 0): several ranks drawing on one terminal would overwrite each other.
    for k, (index, sample) in enumerate(track(todo, desc, config.progress and shard.local_rank == 0)):
        following = todo[k + 1][1] if k + 1 < len(todo) else None
        same = following is not None and (following.context, following.chat) == (sample.context, sample.chat)
        out = generator(sample, seed=config.seed + index, reuse_next=same)
        store.append(_record(task, sample, index, out, shard))


def _record(task: Task, sample: EvalSample, index: int, out: dict[str, Any], shard: Shard) -> dict[str, Any]:
    """The stored record of one answered sample."""
    scores = task.score(sample, out["prediction"])
    return {
        "id": sample.id,
        "index": index,
        "subtask": sample.subtask,
        "prediction": out["prediction"],
        "chat": out["chat"],
        "compressed": out["compressed"],
        "gold": sample.gold,
        "score": next(iter(scores.values())),
        "scores": scores,
        "prompt_tokens": out["prompt_tokens"],
        "context_tokens": out["context_tokens"],
        "kept_tokens": out["kept_tokens"],
        "generated_tokens": out["generated_tokens"],
        "seconds": out["seconds"],
        "rank": shard.rank,
        "meta": sample.meta,
    }


def _first_duplicate(ids: list[str]) -> str:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return ""


def finalize(
    store: RecordStore, task: Task, config: EvalConfig, method: Method | None, order: list[str] | None = None,
    method_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the record files, compute the metrics and write ``metrics.json`` and ``summary.md``."""
    records = store.merge(order)
    if order is not None:
        wanted = set(order)
        records = [r for r in records if str(r["id"]) in wanted]
    expected = len(order) if order is not None else _expected(store.dir)
    info = method_info or describe_method(method)
    metrics: dict[str, Any] = {
        "task": config.task,
        "model": config.model_name,
        "method": info,
        "method_label": _label_from_info(info),
        "query_aware": config.query_aware,
        "samples": len(records),
        "expected": expected,
        "complete": expected is None or len(records) >= expected,
        "mean_prompt_tokens": round(mean([r["prompt_tokens"] for r in records]), 1),
        "mean_kept_tokens": round(mean([r["kept_tokens"] for r in records]), 1),
        "mean_kept_fraction": round(mean([r["kept_tokens"] / max(1, r["context_tokens"]) for r in records]), 4),
        "uncompressed": sum(1 for r in records if not r.get("compressed", True)),
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 1),
    }
    metrics.update(task.aggregate(records) if records else {})
    if config.prefill_chunk is not None and method is not None:
        chunked = run_in_chunks(method)
        if chunked is not method:  # what prompts longer than one chunk ran (docs/memory.md)
            metrics["scoring_in_chunks"] = chunked.scoring
    write_json_atomic(store.dir / "metrics.json", metrics)
    lines = [
        f"# {config.task}: {metrics['method_label']}",
        "",
        f"- model: `{config.model_name}`",
        f"- method: `{json.dumps(info)}`",
        f"- compression: {'query-aware (context + question)' if config.query_aware else 'question-agnostic (context only)'}",
        f"- samples: {len(records)} of {expected}" + ("" if metrics["complete"] else " (**incomplete**)"),
        f"- mean prompt tokens {metrics['mean_prompt_tokens']}, mean kept {metrics['mean_kept_tokens']} "
        f"({100 * metrics['mean_kept_fraction']:.1f} % of the compressed part)",
    ]
    if "scoring_in_chunks" in metrics:
        lines.append(f"- prompts longer than the prefill chunk ({config.prefill_chunk}) ran scoring="
                     f"{metrics['scoring_in_chunks']}")
    if metrics["uncompressed"]:
        lines.append(f"- {metrics['uncompressed']} samples were kept whole: their context is not longer than the window")
    lines.append("")
    if records:
        lines += task.report(metrics, records, store.dir)
    write_text_atomic(store.dir / "summary.md", "\n".join(lines) + "\n")
    return metrics


def _label_from_info(info: dict[str, Any]) -> str:
    budget = [f"{k}={info[k]}" for k in ("keep_tokens", "keep_fraction", "remove_fraction") if info.get(k) is not None]
    return " ".join([str(info.get("name", "?")), *budget])


def _expected(out: Path) -> int | None:
    try:
        return json.loads((out / "run.json").read_text(encoding="utf-8")).get("expected")
    except (OSError, json.JSONDecodeError):
        return None


def merge_results(out_dir: str | Path) -> dict[str, Any]:
    """``--merge``: merge the shard files of a finished (or partial) sharded run and write its
    metrics, using the settings recorded in ``run.json``; no model is needed."""
    out = Path(out_dir)
    path = out / "run.json"
    if not path.exists():
        raise ChunkKVError(f"{out} has no run.json: is it a chunkkv eval output folder?")
    saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    method_info = saved.pop("method", None)
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    config = EvalConfig(out_dir=str(out), **{k: v for k, v in saved.items() if k in known and k != "out_dir"})
    task = build_task(config)
    with OutputLock(out, what=f"--out {out}"):
        return finalize(RecordStore(out), task, config, None, order=None, method_info=method_info)
