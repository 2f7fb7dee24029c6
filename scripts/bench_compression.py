"""Cost of compression inside decoding: time per compression, its share of decode time, and
the scheduler's compute buffer.

    python scripts/bench_compression.py --model qwen2.5-coder-0.5b --budget 1024 --buffer 128

Decodes greedily, one token per llama_decode as a chat UI would, until the cache has been
compressed --compressions times, timing every call; a call that compressed is split into its
compression (measured inside the engine) and its decode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from rkv_local import Llama, _native, llama_cpp
from rkv_local.models import resolve_model

PROMPT = (
    "A train leaves a station at 9:00 travelling at 80 km/h. A second train leaves the same station at "
    "10:30 on the same track at 120 km/h. When and where does the second train catch up? Explain every "
    "step carefully, check your arithmetic, then state the answer."
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--buffer", type=int, default=128)
    ap.add_argument("--method", default="rkv")
    ap.add_argument("--compressions", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    path = resolve_model(args.model)
    llm = Llama(str(path), kv_budget=args.budget, kv_buffer=args.buffer, kv_method=args.method,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    ctx = llm._ctx.ctx
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.eval(prompt)

    decode_s: list[float] = []    # calls without a compression
    compress_s: list[float] = []  # engine time of each compression
    decode_after: list[float] = []  # the decode part of calls that compressed
    n_vocab = llm.n_vocab()
    while True:
        stats = _native.seq_stats(ctx)
        if stats.n_compressions >= args.compressions:
            break
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        llm.eval([tok])
        dt = time.perf_counter() - t0
        after = _native.seq_stats(ctx)
        if after.n_compressions > stats.n_compressions:
            spent = after.compress_seconds - stats.compress_seconds
            compress_s.append(spent)
            decode_after.append(dt - spent)
        elif stats.n_compressions > 0:
            decode_s.append(dt)  # steady state: the cache holds between B and B + b cells

    final = _native.seq_stats(ctx)
    per_token = statistics.mean(decode_s)
    per_compression = statistics.mean(compress_s)
    overhead = per_compression / (args.buffer * per_token)
    result = {
        "model": path.name,
        "method": args.method,
        "budget": args.budget,
        "buffer": args.buffer,
        "threads": args.threads,
        "tokens": int(final.n_tokens),
        "compressions": int(final.n_compressions),
        "decode_ms_per_token": 1000 * per_token,
        "compression_ms_mean": 1000 * per_compression,
        "compression_ms_max": 1000 * max(compress_s),
        "overhead_share": overhead,
        "compute_buffer_mib": final.compute_buffer_bytes / 2**20,
        "kv_mib_used": final.kv_bytes_used / 2**20,
        "kv_mib_full": final.kv_bytes_full / 2**20,
    }
    print(f"| model | method | B | b | tokens | decode ms/token | ms/compression (max) | overhead | compute buffer |")
    print(f"|---|---|---|---|---|---|---|---|---|")
    print(f"| {path.name} | {args.method} | {args.budget} | {args.buffer} | {result['tokens']} | "
          f"{result['decode_ms_per_token']:.1f} | {result['compression_ms_mean']:.0f} ({result['compression_ms_max']:.0f}) | "
          f"{100 * overhead:.1f}% | {result['compute_buffer_mib']:.0f} MiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
