"""The paper's throughput table at a steady state: KV memory fixed, as many sequences as fit, each
already at its length, then a fixed number of decode steps; aggregate decode tokens/s.

    python scripts/bench_steady_throughput.py --model MODEL.gguf --kv-memory-gib auto --length 16384 \
        --budget 1024 --buffer 128 --steps 128 --n-gpu-layers -1 --json out.json

KV memory: a number of GiB, or `auto`: what the device holding the cache (the GPUs when layers are
offloaded, else the host) has free once the weights are loaded, less a reserve for compute buffers
(RESERVE_GIB + RESERVE_FRACTION of that free memory), at most --kv-memory-max-gib. The JSON says the
device's total and free memory, the weights' size and the KV memory chosen.

Three rows, each in one llama.cpp context of one KV stream per sequence (flash attention, greedy
tokens not needed: the decoded tokens are random, as the weights may be):

- full: sequences of --length tokens in full caches (llama.cpp caps a context at 256 sequences);
- rkv: sequences with a budget of B + b cells, prefilled to B + (i mod b) tokens so that their
  compressions fall on different steps, as they do in a long run; each decodes --steps tokens
  (one compression per b of them);
- limit: as many sequences as the rkv row, in full caches of B + b (+ steps) cells: the fastest a
  budgeted cache can decode here (the same work without compressions).

Only the decode steps are timed (each one ends synchronized). A run cut short still prints the rows
it finished.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import time
from typing import Any

import numpy as np

from rkv_local import _native, llama_cpp
from rkv_local._library import loaded_library
from rkv_local.batched import available_memory
from rkv_local.llama import padded_cells

GIB = 2**30
# --kv-memory-gib auto leaves this much of the free memory to what is allocated beside the KV cache:
# the compute buffer of 8192-token batches on the 8B shape (the FFN's activations or the batch's
# logits: about 2 GiB), cuBLAS's f16 copies in the CUDA pool, rkv's query rings (1 GiB at 256
# sequences) and scoring graphs; the fraction keeps a larger card's margin in proportion. A context
# that still cannot be allocated is retried with fewer sequences (run_row).
RESERVE_GIB = 4.0
RESERVE_FRACTION = 0.05
# enum ggml_backend_dev_type
DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU = 0, 1, 2
# R-KV's paper (A100 80 GB, DeepSeek-R1-Distill-Llama-8B, 16K-token sequences, budget 1024)
PAPER = {"full": {"n_seq": 30, "tps": 347.0}, "rkv": {"n_seq": 402, "tps": 3188.8}}


def decode(ctx, entries: list[tuple[int, int, int]], n_vocab: int, rng: np.random.Generator) -> None:
    """One llama_decode of (sequence, first position, tokens) entries, random tokens; the last token of
    each entry gives logits."""
    n = sum(count for _, _, count in entries)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        tokens = rng.integers(100, n_vocab - 100, size=n)
        i = 0
        for seq, pos0, count in entries:
            for j in range(count):
                batch.token[i] = int(tokens[i])
                batch.pos[i] = pos0 + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = j == count - 1
                i += 1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
    finally:
        llama_cpp.llama_batch_free(batch)


def device_memory(on_gpu: bool) -> dict[str, Any]:
    """The device that holds the model and cache, as ggml sees it now: the GPUs (summed) when layers
    are offloaded and there are any, else the CPU (the host's memory)."""
    lib = loaded_library()   # ggml's device API, reached through libllama's dependencies
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [d for d in devices if lib.ggml_backend_dev_type(d) in (DEVICE_GPU, DEVICE_IGPU)]
    use_gpus = on_gpu and bool(gpus)
    chosen = gpus if use_gpus else [d for d in devices if lib.ggml_backend_dev_type(d) == DEVICE_CPU][:1]
    free = total = 0
    for dev in chosen:
        dev_free, dev_total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(dev_free), ctypes.byref(dev_total))
        free, total = free + dev_free.value, total + dev_total.value
    if not use_gpus:
        # ggml counts all of a CPU's memory as free; the kernel's MemAvailable is what can be had
        free = min(free, available_memory() or free)
    names = [lib.ggml_backend_dev_description(d).decode(errors="replace") for d in chosen]
    return {"device": " + ".join(names), "kind": "gpu" if use_gpus else "cpu", "free": free, "total": total}


def kv_memory_plan(args, before: dict[str, Any], after: dict[str, Any], weights_bytes: int) -> dict[str, Any]:
    """The KV memory of every row and how it was chosen, in GiB, for the results."""
    plan = {"device": after["device"], "kind": after["kind"], "total_gib": after["total"] / GIB,
            "free_before_load_gib": before["free"] / GIB, "free_after_load_gib": after["free"] / GIB,
            "weights_gib": weights_bytes / GIB}
    if args.kv_memory_gib != "auto":
        return {**plan, "kv_memory_gib": float(args.kv_memory_gib), "bound": "given"}
    reserve = RESERVE_GIB * GIB + RESERVE_FRACTION * after["free"]
    usable = after["free"] - reserve
    if usable <= 0:
        raise SystemExit(f"{after['device']}: {after['free'] / GIB:.2f} GiB free after the weights, less than "
                         f"the reserve of {reserve / GIB:.2f} GiB: give --kv-memory-gib")
    capped = 0 < args.kv_memory_max_gib * GIB < usable
    memory = args.kv_memory_max_gib * GIB if capped else usable
    return {**plan, "reserve_gib": reserve / GIB, "max_gib": args.kv_memory_max_gib, "kv_memory_gib": memory / GIB,
            "bound": "--kv-memory-max-gib" if capped else "free memory"}


def context_params(n_seq: int, cells: int, per_seq_call: int, args):
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_seq * cells
    params.n_seq_max = n_seq
    params.kv_unified = False
    params.n_batch = params.n_ubatch = min(max(n_seq, per_seq_call * n_seq), args.max_batch)
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.n_threads = params.n_threads_batch = args.threads
    return params


def run_row(model, name: str, n_seq: int, cells: int, prefill: list[int], steps: int, args,
            config: _native.CompressionConfig | None, n_vocab: int) -> dict[str, Any]:
    per_seq_call = config.buffer if config else args.prefill_chunk
    n_planned = n_seq
    params = context_params(n_seq, cells, per_seq_call, args)
    ctx = llama_cpp.llama_init_from_model(model, params)
    # the reserve was short on this device (a failed context frees what it got): 1/8 fewer, 3 times at most
    for _ in range(3):
        if ctx or n_seq == 1:
            break
        n_seq = max(1, n_seq * 7 // 8)
        print(f"{name}: no context of {n_planned} x {cells} cells, trying {n_seq} sequences", flush=True)
        params = context_params(n_seq, cells, per_seq_call, args)
        ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"{name}: llama.cpp could not create a context of {n_seq} x {cells} cells")
    prefill = prefill[:n_seq]
    try:
        if config:
            _native.enable(ctx, config)
        rng = np.random.default_rng(0)
        n_batch = params.n_batch
        # prefill: chunks of every sequence, as many as one call takes
        done = [0] * n_seq
        t0 = time.perf_counter()
        while any(d < p for d, p in zip(done, prefill)):
            entries, used = [], 0
            for s in range(n_seq):
                count = min(prefill[s] - done[s], per_seq_call, n_batch - used)
                if count > 0:
                    entries.append((s, done[s], count))
                    done[s] += count
                    used += count
                if used >= n_batch:
                    break
            decode(ctx, entries, n_vocab, rng)
        llama_cpp.llama_synchronize(ctx)
        prefill_s = time.perf_counter() - t0
        # decode: one token of every sequence per step (in calls of at most n_batch tokens)
        step_s = []
        for _ in range(steps):
            t = time.perf_counter()
            for s0 in range(0, n_seq, n_batch):
                decode(ctx, [(s, done[s], 1) for s in range(s0, min(n_seq, s0 + n_batch))], n_vocab, rng)
            llama_cpp.llama_synchronize(ctx)
            step_s.append(time.perf_counter() - t)
            done = [d + 1 for d in done]
        seconds = sum(step_s)
        compressions = sum(_native.seq_stats(ctx, s).n_compressions for s in range(n_seq)) if config else 0
        kv_bytes = n_seq * cells * args.bytes_per_cell
    finally:
        llama_cpp.llama_free(ctx)
    return {"row": name, "n_seq": n_seq, "n_seq_planned": n_planned, "cells_per_seq": cells, "kv_gib": kv_bytes / GIB,
            "prefill_tokens": sum(prefill), "prefill_s": prefill_s, "steps": steps, "decode_s": seconds,
            "tps": n_seq * steps / seconds, "per_seq_tps": steps / seconds, "compressions": compressions}


def kv_memory_arg(text: str) -> str | float:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB or auto, got {text!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a GGUF file")
    ap.add_argument("--kv-memory-gib", type=kv_memory_arg, default="auto",
                    help="KV memory of every row: GiB, or auto (the device's free memory after the weights, "
                         "less a reserve)")
    ap.add_argument("--kv-memory-max-gib", type=float, default=64.0,
                    help="auto: at most this (0: no cap); 64, about an A100 80 GB's share in the paper")
    ap.add_argument("--length", type=int, default=16384, help="tokens of each full-cache sequence")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--buffer", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed (at least the buffer)")
    ap.add_argument("--max-seq", type=int, default=256, help="sequences per context at most (llama.cpp: 256)")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="full caches: tokens per sequence per call")
    ap.add_argument("--max-batch", type=int, default=8192, help="tokens per llama_decode at most")
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rows", default="full,rkv,limit")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    on_gpu = args.n_gpu_layers != 0
    before = device_memory(on_gpu)
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = args.n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        raise SystemExit(f"cannot load {args.model}")
    kv_plan = kv_memory_plan(args, before, device_memory(on_gpu), llama_cpp.llama_model_size(model))
    print(json.dumps({"kv_memory": kv_plan}), flush=True)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_head_kv = llama_cpp.llama_model_n_head_kv(model)
    head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
    args.bytes_per_cell = n_layer * n_head_kv * head_dim * 2 * 2   # K and V, f16
    memory = kv_plan["kv_memory_gib"] * GIB
    max_seq = min(args.max_seq, int(llama_cpp.llama_max_parallel_sequences()))
    B, b = args.budget, args.buffer
    results: list[dict[str, Any]] = []

    def fits(cells: int) -> int:
        return max(1, min(max_seq, int(memory // (cells * args.bytes_per_cell))))

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "kv_memory": kv_plan, "rows": results, "paper": PAPER}, f, indent=1)

    def report(row: dict[str, Any]) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)
        save()

    save()   # the sizing, even if no row ends

    try:
        rows = args.rows.split(",")
        n_rkv = fits(padded_cells(B + b))
        if "full" in rows:
            cells = padded_cells(args.length + args.steps)
            n = fits(cells)
            report(run_row(model, "full", n, cells, [args.length] * n, args.steps, args, None, n_vocab))
        if "rkv" in rows:
            config = _native.CompressionConfig(budget=B, buffer=b)
            prefill = [B + (s % b) for s in range(n_rkv)]
            report(run_row(model, "rkv", n_rkv, padded_cells(B + b), prefill, args.steps, args, config, n_vocab))
        if "limit" in rows:
            prefill = [B + (s % b) for s in range(n_rkv)]
            report(run_row(model, "limit", n_rkv, padded_cells(B + b + args.steps), prefill, args.steps, args, None, n_vocab))
    finally:
        llama_cpp.llama_model_free(model)
    by = {r["row"]: r for r in results}
    if "full" in by and "rkv" in by:
        print(f"rkv / full: {by['rkv']['tps'] / by['full']['tps']:.2f}x aggregate decode "
              f"(paper, A100: {PAPER['rkv']['tps'] / PAPER['full']['tps']:.2f}x)")


if __name__ == "__main__":
    main()
