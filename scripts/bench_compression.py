"""Cost of compression inside decoding: time per compression and per phase, their share of decode
time, and the physical limit (a full cache holding B + b tokens).

    python scripts/bench_compression.py --model qwen2.5-coder-0.5b --budget 1024 --buffer 128

First a full-cache run decodes greedily from a short prompt until the cache holds B + b tokens; its
speed over the last --limit-tokens tokens is the physical limit (no budgeted run holds more cells).
Its tokens then serve as the text of every configuration (--methods; `rkv/portable` is rkv on the
portable graph, `rkv` the fused kernel): each prefills the first B + b - 8 of them, then decodes
greedily one token per llama_decode until it has compressed --compressions times. The
configurations take turns, one compression each, so that a noisy machine slows them alike. A
decode call that compressed is split into its compression (measured inside the engine, per phase:
rkv_get_profile) and its decode.
"""
from __future__ import annotations

import argparse
import json
import os
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
PHASES = ["build", "importance", "redundancy", "host", "compaction"]


def next_token(llm: Llama) -> int:
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def full_cache_run(path, n_cells: int, limit_tokens: int, threads: int, devices: dict) -> tuple[list[int], float]:
    """Tokens of a greedy run up to n_cells cells, and its ms/token over the last limit_tokens."""
    llm = Llama(str(path), n_ctx=n_cells + 64, n_threads=threads, n_threads_batch=threads, verbose=False, **devices)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.eval(tokens)
    eos = llama_cpp.llama_vocab_eos(llama_cpp.llama_model_get_vocab(llm._model.model))
    times = []
    while len(tokens) < n_cells:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        logits[eos] = -np.inf  # keep generating, as the long runs of rkv-local bench do
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        llm.eval([tok])
        llama_cpp.llama_synchronize(llm._ctx.ctx)   # a device backend (CUDA, RPC) returns before it computed
        times.append(time.perf_counter() - t0)
        tokens.append(tok)
    llm.close()
    return tokens, statistics.mean(times[-limit_tokens:])


class Run:
    """One configuration: a budgeted Llama and what its compressions cost."""

    def __init__(self, path, name: str, budget: int, buffer: int, threads: int, devices: dict, text: list[int]):
        self.name = name
        method, _, kernels = name.partition("/")
        old = os.environ.get(_native.KERNELS_ENV)
        os.environ[_native.KERNELS_ENV] = kernels or "auto"
        try:
            self.llm = Llama(str(path), kv_budget=budget, kv_buffer=buffer, kv_method=method,
                             n_threads=threads, n_threads_batch=threads, verbose=False, **devices)
        finally:
            if old is None:
                os.environ.pop(_native.KERNELS_ENV)
            else:
                os.environ[_native.KERNELS_ENV] = old
        self.ctx = self.llm._ctx.ctx
        self.llm.eval(text[: budget + buffer - 8])
        assert _native.seq_stats(self.ctx).n_compressions == 0
        self.decode_s: list[float] = []   # calls without a compression
        self.compress_s: list[float] = []  # engine time of each compression
        self.phases = {p: 0.0 for p in PHASES}
        self.path = "none"

    def until_next_compression(self) -> None:
        before = _native.seq_stats(self.ctx)
        prof0 = _native.profile(self.ctx)
        while True:
            tok = next_token(self.llm)
            t0 = time.perf_counter()
            self.llm.eval([tok])
            llama_cpp.llama_synchronize(self.ctx)
            dt = time.perf_counter() - t0
            after = _native.seq_stats(self.ctx)
            if after.n_compressions > before.n_compressions:
                self.compress_s.append(after.compress_seconds - before.compress_seconds)
                prof = _native.profile(self.ctx)
                for p in PHASES:
                    self.phases[p] += getattr(prof, f"{p}_seconds") - getattr(prof0, f"{p}_seconds")
                self.path = _native.REDUNDANCY_PATHS[prof.redundancy_path]
                return
            if before.n_compressions > 0:
                self.decode_s.append(dt)  # steady state: the cache holds between B and B + b cells

    def result(self, buffer: int, limit_s: float) -> dict:
        n = len(self.compress_s)
        per_token = statistics.mean(self.decode_s)
        per_compression = statistics.mean(self.compress_s)
        phases_ms = {p: 1000 * self.phases[p] / n for p in PHASES}
        phases_ms["other"] = 1000 * per_compression - sum(phases_ms.values())
        with_compression = per_token + per_compression / buffer
        final = _native.seq_stats(self.ctx)
        return {
            "config": self.name,
            "redundancy_path": self.path,
            "compressions": n,
            "decode_ms_per_token": 1000 * per_token,
            "compression_ms_mean": 1000 * per_compression,
            "compression_ms_max": 1000 * max(self.compress_s),
            "phases_ms": phases_ms,
            "share_of_decode": per_compression / (buffer * per_token),
            "ms_per_token_with_compression": 1000 * with_compression,
            "share_of_limit": limit_s / with_compression,
            "compute_buffer_mib": final.compute_buffer_bytes / 2**20,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--buffer", type=int, default=128)
    ap.add_argument("--methods", default="rkv/portable,rkv,snapkv,h2o,streamingllm,keydiff,triattention",
                    help="comma-separated; rkv/portable: rkv on the portable graph (the path before the fused kernel)")
    ap.add_argument("--compressions", type=int, default=4)
    ap.add_argument("--limit-tokens", type=int, default=64, help="tokens over which the full cache's speed is taken")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gpu-layers", type=int, default=None,
                    help="-1: every layer and the cache on the GPU (default 0; every layer with --rpc)")
    ap.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                    help="llama.cpp rpc-server(s) holding the layers and their caches (the device path over RPC)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)

    path = resolve_model(args.model)
    n_cells = args.budget + args.buffer
    devices = {} if args.n_gpu_layers is None else {"n_gpu_layers": args.n_gpu_layers}
    if args.rpc:
        devices["rpc_servers"] = args.rpc
    text, limit_s = full_cache_run(path, n_cells, args.limit_tokens, args.threads, devices)
    runs = [Run(path, name, args.budget, args.buffer, args.threads, devices, text)
            for name in args.methods.split(",")]
    for _ in range(args.compressions):
        for run in runs:  # in turn: one compression each
            run.until_next_compression()
    results = [run.result(args.buffer, limit_s) for run in runs]

    where = f"rpc {args.rpc}" if args.rpc else f"n_gpu_layers {args.n_gpu_layers or 0}"
    print(f"{path.name}, B = {args.budget}, b = {args.buffer}, {args.threads} threads, {where}, "
          f"{args.compressions} compressions per configuration")
    print(f"physical limit: a full cache holding B + b = {n_cells} tokens decodes at "
          f"{1000 * limit_s:.1f} ms/token ({1 / limit_s:.1f} tokens/s)")
    print()
    print("| config | path | decode ms/token | ms/compression (max) | " + " | ".join(PHASES + ["other"])
          + " | share of decode | tokens/s incl. compression | × limit | compute buffer |")
    print("|---|---|---|---|" + "---|" * (len(PHASES) + 1) + "---|---|---|---|")
    for r in results:
        phases = " | ".join(f"{r['phases_ms'][p]:.1f}" for p in PHASES + ["other"])
        print(f"| {r['config']} | {r['redundancy_path']} | {r['decode_ms_per_token']:.1f} | "
              f"{r['compression_ms_mean']:.1f} ({r['compression_ms_max']:.0f}) | {phases} | "
              f"{100 * r['share_of_decode']:.1f}% | {1000 / r['ms_per_token_with_compression']:.1f} | "
              f"{100 * r['share_of_limit']:.0f}% | {r['compute_buffer_mib']:.0f} MiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": path.name, "budget": args.budget, "buffer": args.buffer, "threads": args.threads,
                       "n_gpu_layers": args.n_gpu_layers, "rpc": args.rpc,
                       "limit_ms_per_token": 1000 * limit_s, "configs": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
