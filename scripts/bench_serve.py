"""`rkv-local serve` against `BatchedLlama.generate_batch` on the same requests: aggregate decode
speed of streaming `openai` clients and of the Python API, in one run.

    python scripts/bench_serve.py smollm2-135m --parallel 4 --tokens 2000 --kv-budget 256

Each of `--parallel` requests asks for exactly `--tokens` tokens (greedy, end-of-generation tokens
masked), first through `BatchedLlama.generate_batch` in this process, then through a server started
as a subprocess with the same settings, with one streaming `openai` client per request (threads).
Aggregate tok/s = all generated tokens / wall time from the first request to the last token.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

import openai

from rkv_local import BatchedLlama
from rkv_local.evals.decoding import eog_tokens
from rkv_local.models import resolve_model

PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how a steam engine works, in detail.",
           "Describe a journey across a desert.", "Tell the history of a small mountain village.",
           "Write a long letter to a friend about a garden.", "Explain the rules of chess, step by step.",
           "Describe a day in a busy harbour.", "Tell a long tale about a clever fox."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_speed(model: str, args: argparse.Namespace, settings: Dict) -> float:
    with BatchedLlama(model, n_seq_max=args.parallel, kv_budget=args.kv_budget, n_threads=args.threads,
                      verbose=False) as batch:
        bias = {int(t): -100.0 for t in eog_tokens(batch._proto)}
        start = time.perf_counter()
        answers = batch.generate_batch(PROMPTS[:args.parallel], logit_bias=bias, **settings)
        seconds = time.perf_counter() - start
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return tokens / seconds


def serve_speed(model: str, args: argparse.Namespace, settings: Dict, bias: Dict[str, float]) -> float:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rkv_local.cli", "serve", model, "--port", str(port),
                               "--parallel", str(args.parallel), "--kv-budget", str(args.kv_budget),
                               "--n-threads", str(args.threads), "--model-alias", "m"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, "the server did not start"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600, max_retries=0)

        def one(prompt: str) -> int:
            stream = client.completions.create(model="m", prompt=prompt, stream=True, logit_bias=bias,
                                               stream_options={"include_usage": True}, **settings)
            return [chunk for chunk in stream][-1].usage.completion_tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            tokens = sum(pool.map(one, PROMPTS[:args.parallel]))
        return tokens / (time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model name (rkv-local's list) or a GGUF path")
    parser.add_argument("--parallel", type=int, default=4, choices=range(1, len(PROMPTS) + 1), metavar="S")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--kv-budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = str(resolve_model(args.model))
    settings = dict(max_tokens=args.tokens, temperature=0.0)
    api = api_speed(model, args, settings)
    with BatchedLlama(model, n_seq_max=1, n_ctx=256, verbose=False) as probe:
        bias = {str(int(t)): -100.0 for t in eog_tokens(probe._proto)}
    served = serve_speed(model, args, settings, bias)
    print(f"| requests | tokens each | generate_batch tok/s | serve + openai clients tok/s | serve / generate_batch |")
    print("|---|---|---|---|---|")
    print(f"| {args.parallel} | {args.tokens} | {api:.1f} | {served:.1f} | {served / api:.3f} |")


if __name__ == "__main__":
    main()
