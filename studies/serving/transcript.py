"""A transcript of ``chunkkv serve`` answering concurrent requests: start, ``/health``, four concurrent
``/v1/chat/completions`` of ~0.8k-1.2k tokens, SIGINT; the server's own output included.

Writes ``studies/serving/results/serve_transcript.txt``. About 2 minutes.

    python -m studies.serving.transcript
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
from .quality import OUT, SRC, free_port, post


def main() -> None:
    from transformers import AutoTokenizer

    from chunkkv.commands.serve import model_folder
    from .capacity import build_requests

    tokenizer = AutoTokenizer.from_pretrained(model_folder("smollm2"))
    requests = [build_requests(tokenizer, 4, n, offset=120000)[i] for i, n in enumerate((800, 950, 1100, 1250))]
    port = free_port()
    command = [sys.executable, "-m", "chunkkv.cli", "serve", "--model", "smollm2", "--method", "chunkkv",
               "--keep-fraction", "0.2", "--port", str(port), "--threads", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    log_path = OUT / "serve_transcript.server.log"
    lines = [f"$ chunkkv serve --model smollm2 --method chunkkv --keep-fraction 0.2 --port {port} --threads 2 &"]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    lines += [f"$ curl -s {base}/health", response.read().decode()]
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(log_path.read_text())
                time.sleep(1)

        def ask(request: dict):
            content = request["document"] + "\n\n" + request["question"]
            start = time.perf_counter()
            reply = post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": content}],
                                                         "max_tokens": 32, "temperature": 0})
            return request, reply, time.perf_counter() - start

        lines.append(f"$ # 4 concurrent POST {base}/v1/chat/completions (an essay slice with one made-up fact, "
                     "then a question; max_tokens 32, temperature 0)")
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            for i, (request, reply, seconds) in enumerate(pool.map(ask, requests)):
                usage = reply["usage"]
                lines += [f"[{i}] {request['question']}",
                          f"    -> {reply['choices'][0]['message']['content']!r}",
                          f"    prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']} "
                          f"({seconds:.1f} s; expected: {request['answer']})"]
        lines.append(f"# all 4 answered in {time.perf_counter() - start:.1f} s")
        lines.append(f"$ kill -INT {server.pid}")
        server.send_signal(signal.SIGINT)
        lines.append(f"# exit code {server.wait(timeout=60)}")
    lines += ["", "----- the server's output -----", log_path.read_text()]
    (OUT / "serve_transcript.txt").write_text("\n".join(lines) + "\n")
    log_path.unlink()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
