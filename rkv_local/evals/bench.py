"""Decode and prefill speed, K/V bytes and process memory of the full cache against compressed
caches, for several generated lengths.

Every run starts a fresh model on a chat prompt (a few built-in word problems, padded to about
`--prompt-tokens`), prefills it, then decodes exactly `length` tokens greedily with every
end-of-generation token masked, so each run reaches its length. Runs are interleaved: for each
length and repetition, every configuration runs once, in an order rotated between repetitions, so
speed ratios hold on a machine whose load drifts.

Loops (`--loops`). `eval` is the raw decode loop (argmax, `Llama.eval` of one token): what the
engine gives. `completion` decodes through `Llama.create_completion(..., stream=True)`, the loop
every user-facing path takes (chat, streaming, `BatchedLlama`, `serve`): detokenization, stop
strings, chunks. `completion-llama-cpp-python` is that loop with llama-cpp-python's own
detokenization (the whole completion again at every token), for comparison. Each run's speed is
also given per quarter of its generated tokens: a loop whose cost per token grows with the length
shows as a last quarter slower than the first while the cache does not grow.

Physical limit. A budgeted cache decodes at best as fast as a full cache that holds B + b cells,
the most it ever holds. Each length, repetition and loop also times that: a full cache decoding
from a shortened prompt until it holds B + b cells, its speed taken over its last quarter. The
table gives every budgeted run's speed as a share of the limit measured by the same loop (whole
run and last quarter).

Memory. K/V bytes come from the engine (`kv_stats`: cells in use times bytes per cell; the full
cache holds one cell per token). A sliding-window model's (Gemma 3, gpt-oss) are both of its
caches: the full-attention layers' (compressed with a budget) plus the window layers' (the window,
with or without a budget); the window's share is also given apart. `peak RSS Δ` is the growth of the process's resident memory
during the run: the kernel's peak counter (VmHWM) is reset through `/proc/self/clear_refs`
right before the model is loaded and read after the last token, minus the resident size measured
just before loading (garbage collected, heap trimmed). It counts the model weights the run touched,
the K/V cache, the compute buffers and the logits, like a process that ran only this
configuration (above the interpreter's own baseline). Where the counter cannot be reset (not
Linux), the process-wide `ru_maxrss` is reported instead and is monotonic over the whole run.
The full cache is created with `n_ctx` = prompt + length (rounded up to 256), as a user who
plans that length would; its K/V buffer is allocated at once.
With an NVIDIA GPU (`--n-gpu-layers`), the GPU memory the process holds at the end of each run is
read from nvidia-smi; the K/V buffer is allocated up front, so that is close to the run's peak.

Outputs in `--out`: `bench.json` (settings, every run, summary; rewritten after each run),
`bench.md` (table), `bench_speed.png` and `bench_memory.png`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tqdm import tqdm

from .. import _native, llama_cpp
from ..llama import CACHE_PAD, padded_cells
from . import throughput
from .decoding import eog_tokens, greedy_token
from .measure import gpu_memory_bytes, machine_info, max_rss_bytes, proc_status, release_memory, reset_peak_rss
from .prompts import build_prompt
from .report import log, markdown_table, progress_bar, write_json, write_results
from .runs import RunConfig, add_kv_arguments, add_model_arguments, configs_from_args, open_llama, parse_int_list, resolve

HELP = "decode/prefill speed and memory: full cache vs compressed, interleaved"
LOOPS = ("eval", "completion", "completion-llama-cpp-python")
EXAMPLE = "example:\n  rkv-local bench qwen2.5-coder-0.5b --methods rkv,snapkv --budgets 1024 --lengths 1k,8k"

MIB = 2**20

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, rpc=True)
    add_kv_arguments(parser, methods="rkv", budgets="1024")
    parser.add_argument("--lengths", type=parse_int_list, metavar="LIST", default=parse_int_list("1k,2k,4k,8k"),
                        help="generated tokens per run, comma-separated (1k = 1024; default: 1k,2k,4k,8k)")
    parser.add_argument("--repeats", type=int, metavar="N", default=1, help="repetitions of each run (default: %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, metavar="N", default=512,
                        help="approximate prompt length; the prompt is a chat turn of built-in word problems "
                             "(default: %(default)s)")
    parser.add_argument("--full-n-batch", type=int, metavar="N", default=512,
                        help="n_batch of the full cache (llama-cpp-python's default); a compressed cache "
                             "prefills in chunks of --kv-buffer (default: %(default)s)")
    parser.add_argument("--loops", type=parse_loops, metavar="LIST", default=parse_loops("eval,completion"),
                        help=f"decode loops, comma-separated among {', '.join(LOOPS)}: the raw eval loop, "
                             f"create_completion streamed, and the latter with llama-cpp-python's own "
                             f"detokenization (default: eval,completion)")
    parser.add_argument("--no-full", action="store_true",
                        help="leave the full cache out, unless --methods names it (its runs are the longest); "
                             "the × full columns stay empty")
    parser.add_argument("--sample-every", type=int, metavar="N", default=256,
                        help="record time and K/V bytes every this many generated tokens (default: %(default)s)")
    parser.add_argument("--parallel", action="store_true",
                        help="throughput at a fixed KV memory instead: as many sequences as fit, decoded together "
                             "(rkv_local.evals.throughput)")
    parser.add_argument("--kv-memory", type=int, metavar="BYTES", default=0,
                        help="with --parallel: the KV memory (default: one full-cache sequence of each length)")
    parser.add_argument("--out", type=Path, metavar="DIR", default=Path("bench-out"), help="output folder (default: %(default)s)")


def parse_loops(text: str) -> list[str]:
    loops = [loop.strip() for loop in str(text).split(",") if loop.strip()]
    for loop in loops:
        if loop not in LOOPS:
            raise argparse.ArgumentTypeError(f"unknown loop {loop!r}; choose from {', '.join(LOOPS)}")
    if not loops:
        raise argparse.ArgumentTypeError("empty list")
    return list(dict.fromkeys(loops))


def run_label(config_label: str, loop: str) -> str:
    return config_label if loop == "eval" else f"{config_label} ({loop})"


class Timeline:
    """Time and K/V bytes after chosen numbers of decoded tokens: every ``step``, each quarter of
    the run, and its end."""

    def __init__(self, llm, length: int, step: int, progress: Optional[tqdm]) -> None:
        self._llm, self._step, self._progress = llm, step, progress
        self._marks = {length * q // 4 for q in range(1, 5)}
        self.start = time.perf_counter()
        self.points: list[dict[str, Any]] = []

    def restart(self) -> None:
        self.start = time.perf_counter()

    def record(self, generated: int) -> None:
        if generated % self._step and generated not in self._marks:
            return
        s = self._llm.kv_stats()
        self.points.append({"generated": generated, "seconds": time.perf_counter() - self.start,
                            "kv_bytes_used": s.kv_bytes_used + s.kv_bytes_window, "cells_used": s.cells_used})
        if self._progress is not None:
            self._progress.update(generated - (self.points[-2]["generated"] if len(self.points) > 1 else 0))


def decode_eval(llm, prompt: list[int], length: int, banned: np.ndarray, timeline: Timeline) -> tuple[Any, str]:
    """The raw loop: the prompt in one eval, then argmax and eval of one token, ``length`` times."""
    llm.eval(prompt)
    after_prefill = llm.kv_stats()
    timeline.restart()
    generated: list[int] = []
    for i in range(1, length + 1):
        tok = greedy_token(llm, banned)
        llm.eval([tok])
        generated.append(tok)
        timeline.record(i)
    return after_prefill, llm.detokenize(generated[:48]).decode("utf-8", errors="replace")


def decode_completion(llm, prompt: list[int], length: int, banned: np.ndarray, timeline: Timeline,
                      llama_cpp_python_detokenize: bool = False) -> tuple[Any, str]:
    """``create_completion(stream=True)``, greedy: the loop users go through. Its logits processor
    (which masks the end tokens) runs once per token right before sampling, after the previous token
    was evaluated: there it starts the clock (prompt done) and records the tokens decoded so far."""
    if llama_cpp_python_detokenize:
        llm._detokenizer = None   # rkv_local.Llama.detokenize then asks llama-cpp-python's tokenizer
    state: dict[str, Any] = {"calls": 0}

    def mask_and_record(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if state["calls"] == 0:
            state["after_prefill"] = llm.kv_stats()
            timeline.restart()
        else:
            timeline.record(state["calls"])
        state["calls"] += 1
        scores[banned] = -np.inf
        return scores

    head: list[str] = []
    finish = None
    for chunk in llm.create_completion(prompt, max_tokens=length, temperature=0.0, stream=True,
                                       logits_processor=llama_cpp.LogitsProcessorList([mask_and_record])):
        choice = chunk["choices"][0]
        if sum(map(len, head)) < 200:
            head.append(choice["text"])
        finish = choice["finish_reason"] or finish
    if finish != "length" or state["calls"] != length:
        raise SystemExit(f"error: the completion loop ended after {state['calls']} tokens ({finish}), not {length}")
    # the last token is sampled and streamed, not evaluated: its step ends with the stream
    timeline.record(length)
    return state["after_prefill"], "".join(head)


def run_one(model_path: Path, config: RunConfig, prompt_text_tokens: list[int], length: int, args,
            progress: Optional[tqdm] = None, sample_every: Optional[int] = None, loop: str = "eval") -> dict[str, Any]:
    n_prompt = len(prompt_text_tokens)
    n_ctx = padded_cells(n_prompt + length + 1)
    release_memory()
    before = proc_status()
    peak_reset = reset_peak_rss()
    t0 = time.perf_counter()
    llm = open_llama(model_path, config, n_ctx=n_ctx, threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                     n_batch=args.full_n_batch if config.method == "full" else config.buffer, rpc_servers=args.rpc)
    load_s = time.perf_counter() - t0
    try:
        banned = eog_tokens(llm)
        timeline = Timeline(llm, length, max(1, sample_every or args.sample_every), progress)
        t0 = time.perf_counter()
        if loop == "eval":
            after_prefill, text_head = decode_eval(llm, prompt_text_tokens, length, banned, timeline)
        else:
            after_prefill, text_head = decode_completion(llm, prompt_text_tokens, length, banned, timeline,
                                                         llama_cpp_python_detokenize=loop != "completion")
        prefill_s = timeline.start - t0
        checkpoints = timeline.points
        decode_s = checkpoints[-1]["seconds"]
        stats = llm.kv_stats()
        status = proc_status()
        peak = status.get("VmHWM") if peak_reset else max_rss_bytes()
        ctx = llm._ctx.ctx
        physical = int(llama_cpp.llama_n_ctx(ctx))
        bytes_per_cell = _native.bytes_per_cell(ctx)
        compute_buffer = _native.seq_stats(ctx).compute_buffer_bytes if config.method != "full" else None
        gpu = gpu_memory_bytes()
    finally:
        llm.close()
        del llm
    compress_prefill = after_prefill.compress_seconds
    return {
        **config.to_dict(),
        "label": run_label(config.label, loop),
        "config_label": config.label,
        "loop": loop,
        "length": length,
        "prompt_tokens": n_prompt,
        "n_ctx_physical": physical,
        "load_seconds": load_s,
        "prefill_seconds": prefill_s,
        "prefill_tps": n_prompt / prefill_s if prefill_s > 0 else None,
        "decode_seconds": decode_s,
        "decode_tps": length / decode_s if decode_s > 0 else None,
        "compressions": stats.compressions,
        "compressions_prefill": after_prefill.compressions,
        "compress_seconds": stats.compress_seconds,
        "compress_seconds_decode": stats.compress_seconds - compress_prefill,
        "evicted_tokens": stats.evicted_tokens,
        "cells_used": stats.cells_used,
        "cells_peak": stats.cells_peak,
        "n_tokens": stats.n_tokens,
        # both caches of a sliding-window model; the window's also apart
        "kv_bytes_used": stats.kv_bytes_used + stats.kv_bytes_window,
        "kv_bytes_full": stats.kv_bytes_full + stats.kv_bytes_window,
        "kv_bytes_allocated": physical * bytes_per_cell + stats.kv_bytes_window_allocated,
        "kv_bytes_window": stats.kv_bytes_window,
        "kv_bytes_window_allocated": stats.kv_bytes_window_allocated,
        "compute_buffer_bytes": compute_buffer,
        "rss_before_bytes": before.get("VmRSS"),
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": (peak - before["VmRSS"]) if peak and "VmRSS" in before else None,
        "peak_reset": peak_reset,
        "rss_anon_delta_bytes": (status["RssAnon"] - before["RssAnon"])
        if "RssAnon" in status and "RssAnon" in before else None,
        "gpu_memory_bytes": gpu,
        "checkpoints": checkpoints,
        "tail_tps": tail_tps(checkpoints),
        "quarter_tps": quarter_tps(checkpoints, length),
        "text_head": text_head,
    }


def limit_run(model_path: Path, cells: int, prompt: list[int], args, progress: Optional[tqdm] = None,
              loop: str = "eval") -> dict[str, Any]:
    """The physical limit of a budget: a full cache decoding until it holds ``cells`` = B + b cells
    (no budgeted run ever holds more), its speed taken over the last quarter of the decoded tokens.
    The prompt is cut to at most half of that so that there is a decode to time."""
    head = prompt[: max(1, min(len(prompt), cells // 2))]
    r = run_one(model_path, RunConfig("full"), head, cells - len(head), args, progress, sample_every=16, loop=loop)
    r.update(label=run_label(f"limit@{cells}", loop), kind="limit", limit_cells=cells)
    return r


def tail_tps(points: list[dict[str, Any]]) -> Optional[float]:
    """Decode tokens/s over the last quarter of a run's checkpoints: the speed at its length,
    compressions included."""
    if len(points) < 2:
        return None
    last = points[-1]
    start = max((p for p in points[:-1] if p["generated"] <= 0.75 * last["generated"]),
                key=lambda p: p["generated"], default=points[0])
    seconds = last["seconds"] - start["seconds"]
    return (last["generated"] - start["generated"]) / seconds if seconds > 0 else None


def quarter_tps(points: list[dict[str, Any]], length: int) -> list[Optional[float]]:
    """Decode tokens/s over each quarter of the ``length`` generated tokens (checkpoints at the quarters)."""
    seconds = {0: 0.0, **{p["generated"]: p["seconds"] for p in points}}
    marks = [length * q // 4 for q in range(5)]
    out: list[Optional[float]] = []
    for a, b in zip(marks, marks[1:]):
        span = seconds[b] - seconds[a] if a in seconds and b in seconds else 0.0
        out.append((b - a) / span if span > 0 else None)
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (length, configuration): medians over repetitions, ratios to the full cache."""
    limits = limit_speeds(runs)
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    order: list[tuple[int, str]] = []
    for r in runs:
        if r.get("kind") == "limit":
            continue
        key = (r["length"], r["label"])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(r)

    def med(rows, field):
        values = [r[field] for r in rows if r.get(field) is not None]
        return float(np.median(values)) if values else None

    def loop_of(r):
        return r.get("loop", "eval")

    rows = []
    for key in sorted(order, key=lambda k: (k[0], LOOPS.index(loop_of(groups[k][0])), groups[k][0]["method"] != "full",
                                            k[1])):
        g = groups[key]
        first = g[0]
        quarters = [med([{"q": r["quarter_tps"][q]} for r in g], "q") for q in range(4)]
        rows.append({
            "length": key[0], "label": key[1], "config_label": first.get("config_label", key[1]),
            "loop": loop_of(first), "method": first["method"], "budget": first["budget"],
            "buffer": first["buffer"], "repeats": len(g), "prompt_tokens": first["prompt_tokens"],
            "quarter_tps": quarters,
            **{f: med(g, f) for f in (
                "prefill_tps", "decode_tps", "kv_bytes_used", "kv_bytes_full", "kv_bytes_allocated",
                "peak_rss_bytes", "peak_rss_delta_bytes", "compressions", "compress_seconds",
                "compress_seconds_decode", "compute_buffer_bytes", "gpu_memory_bytes", "decode_seconds",
                "tail_tps",
            )},
        })
    full = {(r["length"], r["loop"]): r for r in rows if r["method"] == "full"}
    by_loop = {(r["length"], r["config_label"], r["loop"]): r for r in rows}
    for r in rows:
        f = full.get((r["length"], r["loop"]))
        raw = by_loop.get((r["length"], r["config_label"], "eval"))
        r["x_eval"] = r["decode_tps"] / raw["decode_tps"] if raw and raw["decode_tps"] and r["decode_tps"] else None
        q = r["quarter_tps"]
        r["last_over_first_quarter"] = q[3] / q[0] if q[0] and q[3] else None
        r["decode_speedup"] = (r["decode_tps"] / f["decode_tps"]) if f and f["decode_tps"] and r["decode_tps"] else None
        r["tail_speedup"] = (r["tail_tps"] / f["tail_tps"]) if f and f["tail_tps"] and r["tail_tps"] else None
        r["kv_fraction"] = (r["kv_bytes_used"] / f["kv_bytes_used"]) if f and f["kv_bytes_used"] else None
        r["peak_rss_delta_fraction"] = (r["peak_rss_delta_bytes"] / f["peak_rss_delta_bytes"]) \
            if f and f["peak_rss_delta_bytes"] and r["peak_rss_delta_bytes"] is not None else None
        limit = limits.get((r["budget"] + r["buffer"], r["loop"])) if r["method"] != "full" else None
        r["limit_tps"] = limit
        r["share_of_limit"] = r["decode_tps"] / limit if limit and r["decode_tps"] else None
        r["tail_share_of_limit"] = r["tail_tps"] / limit if limit and r["tail_tps"] else None
    return rows


def limit_speeds(runs: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """Median physical-limit tokens/s per cell count (B + b) and loop, over every limit run."""
    speeds: dict[tuple[int, str], list[float]] = {}
    for r in runs:
        if r.get("kind") == "limit" and r.get("tail_tps"):
            speeds.setdefault((r["limit_cells"], r.get("loop", "eval")), []).append(r["tail_tps"])
    return {key: float(np.median(v)) for key, v in speeds.items()}


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = result["summary"]
    gpu = any(r.get("gpu_memory_bytes") for r in rows)

    def mib(v):
        return None if v is None else v / MIB

    def ratio(v):
        return None if v is None else f"{v:.2f}×"

    def pct(v):
        return None if v is None else f"{100 * v:.0f}%"

    headers = ["generated", "config", "prefill tok/s", "decode tok/s", "× full", "last ¼ tok/s", "× full (last ¼)",
               "% of limit", "% of limit (last ¼)", "K/V MiB", "% of full",
               "peak RSS Δ MiB", "compressions", "compress s"]
    if gpu:
        headers.append("GPU MiB")
    table_rows = []
    for r in rows:
        row = [r["length"], r["label"], r["prefill_tps"], r["decode_tps"], ratio(r["decode_speedup"]),
               r["tail_tps"], ratio(r["tail_speedup"]), pct(r.get("share_of_limit")),
               pct(r.get("tail_share_of_limit")), mib(r["kv_bytes_used"]),
               None if r["kv_fraction"] is None else f"{100 * r['kv_fraction']:.1f}%",
               mib(r["peak_rss_delta_bytes"]), r["compressions"], r["compress_seconds"]]
        if gpu:
            row.append(mib(r["gpu_memory_bytes"]))
        table_rows.append(row)
    head = (f"Model `{s['model']}`, prompt {rows[0]['prompt_tokens'] if rows else '?'} tokens, "
            f"{s['threads']} threads, n_gpu_layers {s['n_gpu_layers']}, kv_buffer {s['kv_buffer']}, "
            f"{s['repeats']} repetition(s) (medians); greedy decoding with end-of-generation masked.\n"
            f"`× full`: decode tokens/s relative to the full cache at the same length (whole run); "
            f"`last ¼`: over the last quarter of the generated tokens, compressions included (the speed "
            f"reached at that length); `% of limit`: decode speed as a share of the physical limit, a full "
            f"cache holding B + b cells ({limit_text(result)}); `K/V MiB`: cache "
            f"in use at the end; `peak RSS Δ`: peak resident memory during the run above the process "
            f"before loading the model.\n\n")
    quarters = [[r["length"], r["label"], *r["quarter_tps"],
                 None if r["last_over_first_quarter"] is None else f"{100 * r['last_over_first_quarter']:.0f}%",
                 r["decode_tps"], None if r["x_eval"] is None else f"{100 * r['x_eval']:.0f}%"] for r in rows]
    per_quarter = ("\n\nDecode tokens/s in each quarter of the generated tokens, and the whole run's speed as a share "
                   "of the raw eval loop's for the same configuration and length (`of eval`):\n\n"
                   + markdown_table(["generated", "config", "¼ 1", "¼ 2", "¼ 3", "¼ 4", "¼ 4 / ¼ 1", "decode tok/s",
                                     "of eval"], quarters))
    return head + markdown_table(headers, table_rows) + per_quarter


def limit_text(result: dict[str, Any]) -> str:
    limits = limit_speeds(result["runs"])
    return ", ".join(f"{cells} cells{'' if loop == 'eval' else f' ({loop})'}: {tps:.2f} tok/s"
                     for (cells, loop), tps in sorted(limits.items())) or "not measured"


def run(args: argparse.Namespace) -> int:
    if args.parallel:
        if args.rpc:
            raise SystemExit("error: --rpc is not supported with --parallel (yet): it measures one host's memory")
        return throughput.run(args)
    model_path = resolve(args.model)
    configs = configs_from_args(args, include_full=not args.no_full)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")

    # the prompt, tokenized once with a throwaway full-cache model
    probe = open_llama(model_path, RunConfig("full"), n_ctx=CACHE_PAD, threads=args.threads)
    try:
        prompt = build_prompt(probe, args.prompt_tokens)
        n_ctx_train = probe._model.n_ctx_train()
    finally:
        probe.close()
    too_long = [n for n in args.lengths if len(prompt) + n + 1 > n_ctx_train]
    if too_long:
        log(f"warning: lengths {too_long} plus the prompt exceed the model's training context ({n_ctx_train})")

    # each length, repetition and loop also times the physical limit of every budget (B + b cells)
    limit_cells = sorted({c.budget + c.buffer for c in configs if c.method != "full"})
    plan: list[tuple[int, int, Any, str]] = []
    for length in args.lengths:
        for rep in range(args.repeats):
            k = rep % len(configs)
            for loop in args.loops:
                plan += [(length, rep, cells, loop) for cells in limit_cells]
                for config in configs[k:] + configs[:k]:
                    plan.append((length, rep, config, loop))
    settings = {
        "model": model_path.name, "model_path": str(model_path), "methods": args.methods,
        "budgets": args.budgets, "kv_buffer": args.kv_buffer, "kv_window": args.kv_window,
        "kv_lambda": args.kv_lambda, "lengths": args.lengths, "repeats": args.repeats,
        "prompt_tokens": len(prompt), "full_n_batch": args.full_n_batch, "threads": args.threads,
        "n_gpu_layers": args.n_gpu_layers, "rpc": args.rpc, "configs": [c.to_dict() for c in configs], "loops": args.loops,
    }
    result: dict[str, Any] = {"settings": settings, "machine": machine_info(args.threads, args.n_gpu_layers),
                              "runs": [], "summary": []}
    def planned_tokens(length: int, config) -> int:
        return config - min(len(prompt), config // 2) if isinstance(config, int) else length

    progress = progress_bar(sum(planned_tokens(length, c) for length, _, c, _ in plan), "bench (tokens)")
    for i, (length, rep, config, loop) in enumerate(plan):
        if isinstance(config, int):
            progress.set_postfix_str(f"run {i + 1}/{len(plan)}: physical limit, {config} cells, {loop} loop, "
                                     f"repetition {rep + 1}")
            r = limit_run(model_path, config, prompt, args, progress, loop=loop)
            r["repetition"] = rep
            result["runs"].append(r)
            if not sys.stderr.isatty():
                log(f"  {r['label']:>18}: {r['tail_tps']:.1f} tok/s at {config} cells")
            continue
        progress.set_postfix_str(f"run {i + 1}/{len(plan)}: {config.label}, {length} tokens, {loop} loop, "
                                 f"repetition {rep + 1}")
        r = run_one(model_path, config, prompt, length, args, progress, loop=loop)
        r["repetition"] = rep
        result["runs"].append(r)
        result["summary"] = summarize(result["runs"])
        write_json(out / "bench.json", result)
        if not sys.stderr.isatty():
            log(f"  {r['label']:>18} {length:>6} tokens: prefill {r['prefill_tps']:.1f} tok/s, decode "
                f"{r['decode_tps']:.1f} tok/s, K/V {r['kv_bytes_used'] / MIB:.1f} MiB, "
                f"peak RSS Δ {(r['peak_rss_delta_bytes'] or 0) / MIB:.0f} MiB")
    progress.close()

    write_results("bench", result, render_markdown(result), out)
    return 0
