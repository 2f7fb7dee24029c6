"""Throughput at a fixed KV memory: how many sequences fit, and how fast they decode together.

`rkv-local bench MODEL --parallel`: for each generated length L the KV memory is fixed (default:
what one full-cache sequence of the prompt plus L tokens needs, `--kv-memory` to choose). The full
cache runs as many sequences as fit in it, and so does each compressed configuration (B + b cells
a sequence); each point of the sweep runs S = 1, 2, 4, ... up to that count, all S sequences in one
`BatchedLlama` on the same prompt, every one generating exactly L tokens (end-of-generation
masked, greedy). Reported per point: aggregate decode tokens/s (all sequences, over the
scheduler's steps in which every sequence decoded one generated token, so no prompt's time is in
it; and with the prefill, over the whole wall time),
per-sequence tokens/s, the K/V bytes the context holds, and the process's peak RSS growth.

The physical limit printed beside each compressed point: the aggregate speed of the same number
of *short* full-cache sequences (caches of B + b tokens: prompt, then B + b - prompt generated
tokens), which is the fastest a budgeted cache could decode on this machine; the measured
aggregate is reported as a share of it. The limit goes through the same loop (`stream_batch`,
llama-cpp-python's completion loop) and generates as many tokens as the rows it is compared with:
each of its sequences runs requests of B + b - prompt tokens back to back until it has generated
L. Their prompts after the first are prefilled within the run, in steps that the decode speed
leaves out like the first prompts'.

`outside decode`: the share of the scheduler's steps spent outside `llama_decode` (waiting for
the sequences' Python loops to hand in their next tokens, sampling, handoffs; `StepStats`).

Outputs in `--out`: `throughput.json`, `throughput.md`, `throughput.png`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .. import BatchedLlama, _native
from ..llama import CACHE_PAD, padded_cells
from .decoding import eog_tokens
from .measure import machine_info, proc_status, release_memory, reset_peak_rss
from .prompts import build_prompt
from .report import log, markdown_table, progress_bar, write_results
from .runs import RunConfig, configs_from_args, open_llama, resolve

MIB = 2**20


def cells_of(config: RunConfig, prompt: int, length: int) -> int:
    """KV cells one sequence of ``config`` holds (the context llama.cpp allocates for it)."""
    need = config.budget + config.buffer if config.method != "full" else prompt + length + 1
    return padded_cells(need)


def sweep(n_max: int) -> list[int]:
    """1, 2, 4, ... and ``n_max`` itself."""
    points, s = [], 1
    while s < n_max:
        points.append(s)
        s *= 2
    return points + [n_max]


def run_point(model_path: Path, config: RunConfig, prompt: list[int], length: int, n_seq: int, n_ctx: int,
              eog: list[int], args, request_tokens: int = 0) -> dict[str, Any]:
    """``n_seq`` sequences of ``length`` generated tokens decoded together; with ``request_tokens``,
    each generates its ``length`` tokens in requests of at most that many, back to back."""
    per_request = request_tokens or length
    rounds = -(-length // per_request)
    lengths = [per_request] * (rounds - 1) + [length - per_request * (rounds - 1)]
    requests = [n for n in lengths for _ in range(n_seq)]   # the first round: one request per sequence
    release_memory()
    base = proc_status().get("VmRSS", 0)
    reset_peak_rss()
    batch = BatchedLlama(model_path, n_seq_max=n_seq, n_ctx=n_ctx, n_threads=args.threads,
                         n_threads_batch=args.threads, n_gpu_layers=args.n_gpu_layers, verbose=False,
                         **config.llama_kwargs())
    try:
        t0 = time.perf_counter()
        for _, chunk in batch.stream_batch([prompt] * len(requests), temperature=0.0,
                                           logit_bias={t: float("-inf") for t in eog},
                                           settings=[dict(max_tokens=n) for n in requests]):
            if isinstance(chunk, Exception):
                raise SystemExit(f"error: {config.label} with {n_seq} sequences: {chunk}")
            if chunk["choices"][0]["finish_reason"] not in (None, "length"):
                raise SystemExit(f"error: a sequence ended early ({chunk['choices'][0]['finish_reason']})")
        seconds = time.perf_counter() - t0
        # a sliding-window model's window caches too (one per sequence, the window whatever the budget)
        kv_bytes = batch.cells_per_seq * n_seq * _native.bytes_per_cell(batch._ctx.ctx) \
            + batch.kv_stats().kv_bytes_window_allocated
        steps = batch.step_stats()
    finally:
        batch.close()
    peak = proc_status().get("VmHWM", 0)
    generated = sum(requests)
    # decoding proper: the scheduler's steps in which every sequence decoded one generated token
    # (a step that carried a prompt chunk, of the first requests or of the later rounds', is prefill)
    decode_tps = steps.single_token_tps
    if decode_tps is None:
        raise SystemExit(f"error: {config.label} with {n_seq} sequences: no decode step ran (length too short?)")
    return {"label": config.label, "method": config.method, "budget": config.budget, "length": length,
            "n_seq": n_seq, "generated": generated, "requests_per_seq": rounds, "seconds": seconds,
            "aggregate_tps": decode_tps, "per_seq_tps": decode_tps / n_seq,
            "aggregate_tps_with_prefill": generated / seconds, "kv_bytes": kv_bytes,
            "step_overhead": steps.overhead, "steps": steps.steps,
            "peak_rss_delta_bytes": max(peak - base, 0) if peak else None}


def run(args: argparse.Namespace) -> int:
    model_path = resolve(args.model)
    configs = configs_from_args(args, include_full=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    probe = open_llama(model_path, RunConfig("full"), n_ctx=CACHE_PAD, threads=args.threads)
    try:
        prompt = build_prompt(probe, args.prompt_tokens)
        eog = [int(t) for t in eog_tokens(probe)]
        per_cell = _native.bytes_per_cell(probe._ctx.ctx)
    finally:
        probe.close()

    points = []
    for length in args.lengths:
        memory = args.kv_memory or cells_of(RunConfig("full"), len(prompt), length) * per_cell
        for config in configs:
            fit = memory // (cells_of(config, len(prompt), length) * per_cell)
            if fit < 1:
                log(f"warning: {config.label} does not fit {memory / MIB:.0f} MiB of KV memory at length {length}")
            for n_seq in sweep(int(fit)) if fit >= 1 else []:
                points.append((length, memory, config, n_seq))
            if config.method != "full":
                short = RunConfig("full")
                for n_seq in sweep(int(fit)) if fit >= 1 else []:
                    points.append((length, memory, short, -n_seq))   # the limit: short full caches

    progress = progress_bar(len(points), "bench --parallel (runs)")
    rows = []
    for length, memory, config, n_seq in points:
        if n_seq > 0:
            row = run_point(model_path, config, prompt, length, n_seq, len(prompt) + length + 1, eog, args)
        else:
            budgeted = next(c for c in configs if c.method != "full")
            short_len = budgeted.budget + budgeted.buffer - len(prompt) - 1
            if short_len < 1:
                raise SystemExit("error: the prompt alone fills budget + buffer; lower --prompt-tokens")
            row = run_point(model_path, config, prompt, length, -n_seq, budgeted.budget + budgeted.buffer, eog, args,
                            request_tokens=short_len)
            row.update(label=f"limit@{budgeted.budget + budgeted.buffer}", tokens_per_request=short_len)
        row["kv_memory"] = memory
        rows.append(row)
        progress.set_postfix_str(f"{row['label']} x{row['n_seq']}: {row['aggregate_tps']:.1f} tok/s", refresh=False)
        progress.update(1)
    progress.close()

    for row in rows:
        if row["method"] != "full":
            limit = next((r for r in rows if r["label"].startswith("limit@") and r["n_seq"] == row["n_seq"]
                          and r["length"] == row["length"]), None)
            full = next((r for r in rows if r["label"] == "full" and r["length"] == row["length"]), None)
            row["share_of_limit"] = row["aggregate_tps"] / limit["aggregate_tps"] if limit else None
            row["x_full"] = row["aggregate_tps"] / full["aggregate_tps"] if full else None
    result = {"settings": {"model": model_path.name, "prompt_tokens": len(prompt), "lengths": args.lengths,
                           "configs": [c.to_dict() for c in configs], "threads": args.threads,
                           "n_gpu_layers": args.n_gpu_layers, "kv_memory": args.kv_memory},
              "machine": machine_info(args.threads, args.n_gpu_layers), "rows": rows}
    write_results("throughput", result, render_markdown(result), out)
    return 0


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    headers = ["length", "config", "sequences", "aggregate tok/s", "per sequence tok/s", "with prefill tok/s",
               "× full (1 seq)", "share of limit", "outside decode", "K/V MiB", "peak RSS Δ MiB"]
    rows = [[r["length"], r["label"], r["n_seq"], r["aggregate_tps"], r["per_seq_tps"],
             r["aggregate_tps_with_prefill"], r.get("x_full"),
             r.get("share_of_limit"), f"{100 * r['step_overhead']:.1f}%", r["kv_bytes"] / MIB,
             (r["peak_rss_delta_bytes"] or 0) / MIB] for r in result["rows"]]
    head = (f"Model `{s['model']}`, prompt {s['prompt_tokens']} tokens, {s['threads']} threads. KV memory fixed "
            f"per length at one full-cache sequence of prompt + length tokens; each configuration runs 1, 2, 4, "
            f"... sequences up to as many as fit. `limit@N`: the same number of short full-cache sequences "
            f"(N cells each: requests of N - prompt tokens back to back, as many tokens as the other rows), the "
            f"fastest a budgeted cache can decode here; `share of limit` is a budgeted row's aggregate speed over "
            f"the limit's with as many sequences; `outside decode`: the share of the scheduler's steps spent "
            f"outside llama_decode.\n\n")
    return head + markdown_table(headers, rows)
