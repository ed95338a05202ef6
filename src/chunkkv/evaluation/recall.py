"""A long-output task: continue a passage of the context, with the cache bounded while decoding.

``chunkkv eval --task recall`` (issue 12). Each sample is ``length`` tokens of the Paul Graham
essays followed by a blank line and the first ``head_words`` words of a sentence that appears
earlier in that text (at depth 10/30/50/70/90 %); the model continues it for ``new_tokens`` tokens.
A model that reads its context copies the passage (induction), so the answer is long and its
reference is known: the ``new_tokens`` tokens that follow the head in the context.

Per sample the prompt is prefilled once (:func:`chunkkv.multi.capture_prefill`) and every
configuration is built from the capture (query-aware: the head ends the compressed prompt):

* ``full``: the full cache;
* ``<method>/B``: the prompt compressed to ``B`` tokens per layer, decoding unbounded (``B + new``
  tokens at the end);
* ``<method>/B/dB``: the same prompt compression and a decode budget ``B`` with
  ``compress_every`` (at most ``B + compress_every`` tokens per layer for any output length);
* ``<method>/B/qa-<scoring>`` (``RecallConfig.agnostic``): question-agnostic: the context alone is
  compressed to ``B`` with ``scoring`` (window / surprisal / reconstruction, or ``default``: what
  question-agnostic ``chunkkv.generate`` runs, :func:`chunkkv.agnostic.agnostic_method`), then the
  head is fed and the answer decoded: does a context compressed before anyone asks keep arbitrary
  passages?

Scores per configuration: ROUGE-L F against the reference text and against the full cache's own
output, and ``copied`` = the leading generated tokens equal to the reference's. Rows are appended to
``recall.jsonl`` (one per sample and configuration), so a run resumes where it stopped. Intervals
are 95 % normal intervals of the mean over samples (t would be wider at small n; n is printed).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..agnostic import agnostic_method
from ..capture import capture_prefix
from ..pipeline import compress_from_capture, prefill
from ..context import stack_contexts
from ..errors import ChunkKVError
from ..generation import Sampling, continue_from
from ..methods import make_method
from ..outputs import ResumableStore
from ..prompt import check_positions
from .metrics import mean_interval, rouge_l_score

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT = "default"  # the --recall-agnostic name of question-agnostic generate's own choice


@dataclass
class RecallConfig:
    """What a recall run measures (see the module docstring)."""

    samples: int = 12
    length: int = 2048
    new_tokens: int = 128
    head_words: int = 12
    budgets: list[int] = field(default_factory=lambda: [512, 256])
    methods: list[str] = field(default_factory=lambda: ["chunkkv", "snapkv", "pyramidkv", "h2o", "streamingllm"])
    every: int = 32
    seed: int = 0
    agnostic: list[str] = field(default_factory=list)  # question-agnostic scorings to run too

    def validate(self) -> None:
        for name in ("samples", "length", "new_tokens", "head_words", "every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ChunkKVError(f"recall {name}={value!r} must be a whole number >= 1")
        if not self.budgets or min(self.budgets) < 1:
            raise ChunkKVError(f"recall budgets {self.budgets} must be positive token counts")
        if self.length < 4 * self.new_tokens:
            raise ChunkKVError(f"recall length={self.length} must be at least 4 x new_tokens={self.new_tokens}")
        for name in self.methods:
            make_method(name, keep_tokens=max(self.budgets))  # unknown names fail here
            for scoring in self.agnostic:
                if scoring != DEFAULT:
                    make_method(name, keep_tokens=max(self.budgets), scoring=scoring)  # and unknown scorings

    def configs(self) -> list[str]:
        """Configuration keys in run order: full, then per budget every method unbounded and bounded."""
        out = ["full"]
        for b in self.budgets:
            out += [f"{m}/{b}" for m in self.methods] + [f"{m}/{b}/d{b}" for m in self.methods]
            out += [f"{m}/{b}/qa-{s}" for s in self.agnostic for m in self.methods]
        return out


@dataclass
class RecallSample:
    """One prompt: ``ids`` = context + blank line + head; ``reference`` = the text the head starts."""

    index: int
    depth: float
    ids: list[int]
    head: str
    reference_ids: list[int]
    reference: str
    context_len: int = 0  # leading tokens of ``ids`` that are the context alone (before the head)


def make_recall_samples(tokenizer, config: RecallConfig) -> list[RecallSample]:
    """``config.samples`` prompts from the essays (deterministic in ``config.seed``)."""
    from ..haystack import paul_graham_text

    out = []
    for i in range(config.samples):
        rng = random.Random(f"recall/{config.length}/{config.seed}/{i}")
        text = paul_graham_text(min_chars=config.length * 6, start=rng.randrange(49))
        context = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][: config.length])
        depth = DEPTHS[i % len(DEPTHS)]
        # sentence starts with room for the head and the whole reference after them
        starts = [m.end() for m in re.finditer(r"[.!?] +(?=[A-Z])", context)]
        room = len(context) - 8 * (config.new_tokens + 4 * config.head_words)
        starts = [s for s in starts if s < room]
        if not starts:
            raise ChunkKVError(f"recall: no sentence start with room for {config.new_tokens} tokens in sample {i}")
        start = min(starts, key=lambda s: abs(s - depth * len(context)))
        words = context[start:].split(" ")
        head = " ".join(words[: config.head_words])
        rest = context[start + len(head):]
        reference_ids = tokenizer(rest, add_special_tokens=False)["input_ids"][: config.new_tokens]
        ids = tokenizer(context + "\n\n" + head, add_special_tokens=False)["input_ids"]
        alone = tokenizer(context, add_special_tokens=False)["input_ids"]
        common = next((j for j, (a, b) in enumerate(zip(alone, ids)) if a != b), min(len(alone), len(ids)))
        out.append(RecallSample(i, depth, ids, head, reference_ids, tokenizer.decode(reference_ids), common))
    return out


def copied_tokens(generated: list[int], reference: list[int]) -> int:
    """How many leading generated tokens equal the reference's."""
    n = 0
    for a, b in zip(generated, reference):
        if a != b:
            break
        n += 1
    return n


@dataclass(frozen=True)
class _Config:
    """A configuration key read back: ``method/B``, ``method/B/dB`` or ``method/B/qa-scoring``."""

    name: str
    budget: int
    decode_budget: int | None = None
    scoring: str | None = None  # question-agnostic scoring, None = query-aware

    @classmethod
    def parse(cls, key: str) -> _Config:
        name, budget, *rest = key.split("/")
        tail = rest[0] if rest else ""
        return cls(name, int(budget), int(tail[1:]) if tail.startswith("d") else None,
                   tail[3:] if tail.startswith("qa-") else None)

    def method(self, tokenizer=None):
        if self.scoring == DEFAULT:  # what question-agnostic chunkkv.generate runs when nothing is asked for
            return agnostic_method(make_method(self.name, keep_tokens=self.budget), tokenizer=tokenizer)
        return make_method(self.name, keep_tokens=self.budget, scoring=self.scoring or "window")


def _method(key: str, tokenizer=None):
    return make_method("full") if key == "full" else _Config.parse(key).method(tokenizer)


def _agnostic_outputs(model, tokenizer, capture, sample: RecallSample, keys: list[str], sampling: Sampling):
    """Question-agnostic rows: compress the context alone (cut from the capture), then feed the head."""
    prefix = capture_prefix(capture, sample.context_len)
    head = torch.tensor([sample.ids[sample.context_len:]], device=capture.input_ids.device)
    out = {}
    for k in keys:
        ctx = compress_from_capture(prefix, _method(k, tokenizer))  # scoring passes run on the prefix, once each
        toks = continue_from(model, ctx, head, sampling)[0].tolist()
        out[k] = (toks, None, _Config.parse(k).budget + len(head[0]) + sampling.max_new_tokens)
    return out


@torch.inference_mode()
def run_sample(model, tokenizer, sample: RecallSample, config: RecallConfig, todo: list[str]) -> list[dict[str, Any]]:
    """Every configuration in ``todo`` on one sample (``full`` is always decoded: it is the reference)."""
    device = next(model.parameters()).device
    ids = torch.tensor([sample.ids], device=device)
    keys = ["full"] + [k for k in todo if k != "full"]
    parsed = {k: _Config.parse(k) for k in keys if k != "full"}
    agnostic = [k for k, c in parsed.items() if c.scoring is not None]
    window = max((_method(k).window for k in keys if k != "full"), default=1)
    if agnostic:
        window += len(sample.ids) - sample.context_len  # the prefix's own window lies before the head
    t0 = time.perf_counter()
    # one prefill for every configuration: the query-aware methods and the question-agnostic ones
    capture = prefill(model, ids, methods=[_method(k, tokenizer) for k in keys if k != "full"], window=window,
                      tokenizer=tokenizer, chat_template=False)  # the prompt is raw text
    capture_s = time.perf_counter() - t0
    sampling = Sampling(max_new_tokens=config.new_tokens)
    outputs: dict[str, tuple[list[int], float | None, int]] = {}
    # Unbounded configurations decode together as one batch (so no time of their own); they hold
    # their prompt budget + every new token at the end.
    unbounded = ["full"] + [k for k, c in parsed.items() if c.decode_budget is None and c.scoring is None]
    if agnostic:
        outputs.update(_agnostic_outputs(model, tokenizer, capture, sample, agnostic, sampling))
    ctxs = [compress_from_capture(capture, _method(k)) for k in unbounded]
    tokens = continue_from(model, stack_contexts(ctxs), None, sampling).tolist()
    for k, toks in zip(unbounded, tokens):
        held = len(sample.ids) if k == "full" else parsed[k].budget
        outputs[k] = (toks, None, held + config.new_tokens)
    for k in keys:
        if k in outputs:
            continue
        ctx = compress_from_capture(capture, _method(k))
        budget = parsed[k].decode_budget
        t1 = time.perf_counter()
        toks = continue_from(model, ctx, None, sampling, decode_budget=budget, compress_every=config.every)[0].tolist()
        # at most budget + every per layer at any step (tests/test_bounded.py checks the bound)
        outputs[k] = (toks, time.perf_counter() - t1, budget + config.every)
    full_text = tokenizer.decode(outputs["full"][0], skip_special_tokens=True)
    rows = []
    for k in todo:
        toks, secs, held = outputs[k]
        text = tokenizer.decode(toks, skip_special_tokens=True)
        rows.append({
            "index": sample.index, "depth": sample.depth, "config": k, "prompt_tokens": len(sample.ids),
            "rougeL_ref": round(rouge_l_score(text, sample.reference), 4),
            "rougeL_full": round(rouge_l_score(text, full_text), 4),
            "copied": copied_tokens(toks, sample.reference_ids), "held_max": held,
            "decode_seconds": None if secs is None else round(secs, 2), "capture_seconds": round(capture_s, 2), "output": text,
        })
    return rows


#: Report files written beside ``recall.jsonl`` (removed with the records by ``overwrite``).
REPORTS = ("recall.md", "recall_summary.json")
#: Settings every row depends on; samples, budgets, methods and scorings only widen the plan.
_ROW_SETTINGS = ("length", "new_tokens", "head_words", "every", "seed")


def recall_settings(config: RecallConfig, model_name: str, dtype: str) -> dict[str, Any]:
    """What every row of a recall folder depends on: a rerun with other settings is refused."""
    return {"task": "recall", "model": model_name, "dtype": dtype, **{k: getattr(config, k) for k in _ROW_SETTINGS}}


def _row_id(row: dict[str, Any]) -> tuple:
    return (row["index"], row["config"])


def _legacy(row: dict[str, Any]) -> dict[str, Any] | None:
    saved = row.get("config_run")
    return {k: saved[k] for k in _ROW_SETTINGS if k in saved} if isinstance(saved, dict) else None


def recall_store(out_dir: str | Path, config: RecallConfig, model_name: str, dtype: str, *,
                 overwrite: bool = False) -> ResumableStore:
    """The folder's ``recall.jsonl`` under the rule of every resumable store
    (:class:`chunkkv.outputs.ResumableStore`); open it (``with``) before loading the model."""
    return ResumableStore(out_dir, "recall.jsonl", recall_settings(config, model_name, dtype), key="config",
                          ident=_row_id, overwrite=overwrite, outputs=REPORTS, legacy=_legacy)


def run_recall(model, tokenizer, config: RecallConfig, out_dir: str | Path | None = None, *,
               store: ResumableStore | None = None, overwrite: bool = False,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or resume) every sample x configuration; rows in ``out_dir/recall.jsonl``.

    The folder follows the rule of every resumable store (:class:`chunkkv.outputs.ResumableStore`);
    ``store``: one from :func:`recall_store` already open. Returns the rows of this run's plan, each once.
    """
    config.validate()
    if store is None:
        if out_dir is None:
            raise ChunkKVError("run_recall needs out_dir (or an open store)")
        name = str(getattr(model, "name_or_path", "") or "")
        store = recall_store(out_dir, config, name, str(next(model.parameters()).dtype).replace("torch.", ""),
                             overwrite=overwrite)
    with store:
        samples = make_recall_samples(tokenizer, config)
        longest = max(len(s.ids) for s in samples) + config.new_tokens - 1
        check_positions(model.config, longest,
                        what=f"--recall-length {config.length} with {config.new_tokens} new tokens reaches position {longest}",
                        fix="lower --recall-length or --recall-new-tokens")
        wanted = config.configs()
        plan = [(s.index, k) for s in samples for k in wanted]
        todo = set(store.plan(plan))
        for sample in samples:
            keys = [k for k in wanted if (sample.index, k) in todo]
            if not keys:
                continue
            t0 = time.perf_counter()
            new = run_sample(model, tokenizer, sample, config, keys)
            for r in new:
                r["config_run"] = asdict(config)
            store.append(*new)  # one sample's rows in one write
            full = next((r for r in new if r["config"] == "full"), None)
            log(f"recall sample {sample.index} (depth {sample.depth:.0%}): {len(new)} configs in "
                f"{time.perf_counter() - t0:.0f} s" + ("" if full is None else f"; full copied {full['copied']} tokens"))
        planned = set(plan)
        return [r for r in store.load() if _row_id(r) in planned]


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration: n, mean ROUGE-L against the reference and the full output (95 % interval),
    mean copied tokens, tokens held per layer at most, decode seconds (bounded runs)."""
    cells: dict[str, list[dict]] = {}
    for r in rows:
        cells.setdefault(r["config"], []).append(r)
    out = {}
    for key, rs in cells.items():
        ref, full = mean_interval([r["rougeL_ref"] for r in rs]), mean_interval([r["rougeL_full"] for r in rs])
        secs = [r["decode_seconds"] for r in rs if r["decode_seconds"] is not None]
        out[key] = {"n": len(rs), "rougeL_ref": [round(x, 3) for x in ref], "rougeL_full": [round(x, 3) for x in full],
                    "copied": round(sum(r["copied"] for r in rs) / len(rs), 1),
                    "held_max": max(r["held_max"] for r in rs),
                    "decode_seconds": round(sum(secs) / len(secs), 2) if secs else None}
    return out


def to_markdown(summary: dict[str, dict[str, Any]], config: RecallConfig, model_label: str) -> str:
    """The long-output table: method x (prompt budget, decode budget), full cache first."""
    n = summary.get("full", {}).get("n", 0)
    lines = [
        f"Passage recall ({model_label}, Paul Graham essays, {config.length}-token contexts, continue a "
        f"{config.head_words}-word sentence head for {config.new_tokens} tokens, greedy, n = {n} samples; "
        "mean [95 % interval]):", "",
        "| method | prompt KV | decode budget | KV held per layer (at most) | ROUGE-L vs reference | ROUGE-L vs full output | copied tokens |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    for key in [k for k in config.configs() if k in summary]:
        c = summary[key]
        if key == "full":
            label = ["full cache", "all", "none"]
        else:
            cfg = _Config.parse(key)
            name = cfg.name if cfg.scoring is None else f"{cfg.name}, question-agnostic ({cfg.scoring} scoring)" \
                if cfg.scoring != DEFAULT else f"{cfg.name}, question-agnostic (generate's default)"
            decode = "none" if cfg.decode_budget is None else f"{cfg.decode_budget} (every {config.every})"
            label = [name, str(cfg.budget), decode]
        lines.append(f"| {' | '.join(label)} | {c['held_max']} | {fmt(c['rougeL_ref'])} | {fmt(c['rougeL_full'])} | {c['copied']} |")
    return "\n".join(lines)
