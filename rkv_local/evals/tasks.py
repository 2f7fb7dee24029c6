r"""Accuracy on GSM8K, MATH-500 or AIME for the full cache and every method × budget.

Each problem is asked in one user turn of the model's chat template, followed by the paper's
instruction ("Please reason step by step, and put your final answer within \boxed{}."). Decoding is
greedy by default; `--temperature 0.6 --top-p 0.95` (or `--paper-sampling`) samples as the
R-KV paper does, seeded per problem so every configuration sees the same seed. The final answer is
the last `\boxed{}`, else the text after `####`, else "the answer is ...", else the last number
(`rkv_local.evals.answers`), compared after normalisation (LaTeX decoration, thousands separators,
fractions and decimals by value).

Every finished problem is appended to `--out`/tasks_results.jsonl at once; a run that is
interrupted and started again with the same settings skips the problems already done for each
configuration (the settings that change an answer form the run id; other runs in the same file
are kept and ignored). Problems run in the outer loop and configurations in the inner one, so a
partial run compares all configurations on the same problems.

Outputs in `--out`: `tasks_results.jsonl`, `tasks.json`, `tasks.md`, `tasks_accuracy.png`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable

from .answers import extract_answer, gold_answer, is_equivalent
from .datasets import DATASETS, data_path, read_jsonl
from .decoding import ChatTemplate, clear_cache
from .measure import machine_info
from .report import file_digest, log, markdown_table, progress_bar, write_results
from .runs import (
    RunConfig, add_kv_arguments, add_model_arguments, configs_from_args, open_batched, open_llama, resolve,
)

HELP = "accuracy on GSM8K / MATH-500 / AIME for each method x budget (resumable)"
EXAMPLE = "example:\n  rkv-local eval tasks qwen2.5-coder-0.5b --data gsm8k --limit 100 --budgets 128,256 --kv-buffer 32 --parallel 8"

PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
TASKS = ("gsm8k", "math", "aime")
DEFAULT_MAX_TOKENS = {"gsm8k": 1024, "math": 4096, "aime": 16384}
RESULTS_FILE = "tasks_results.jsonl"

def item_question(row: dict[str, Any]) -> str:
    text = row.get("question") or row.get("problem")
    if not text:
        raise ValueError("a data row has neither a question nor a problem field")
    return str(text).strip()


def item_key(index: int, row: dict[str, Any]) -> str:
    return f"{index}:{hashlib.sha256(item_question(row).encode()).hexdigest()[:10]}"


def detect_task(path: Path, rows: list[dict[str, Any]]) -> str:
    name = path.name.lower()
    for task in ("gsm8k", "aime", "math"):
        if task in name:
            return task
    if rows and "question" in rows[0]:
        return "gsm8k"
    return "math"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", type=data_path, metavar="NAME|FILE", required=True,
                        help=f"a shipped benchmark ({', '.join(DATASETS)}) or a JSONL file of problems: GSM8K "
                             "(question, answer with '#### N'), MATH-500 or AIME (problem, answer)")
    parser.add_argument("--task", choices=("auto",) + TASKS, default="auto",
                        help="answer format; auto: from the file name, else from the fields (default: auto)")
    parser.add_argument("--limit", type=int, metavar="N", default=0, help="use the first N problems (default: all)")
    parser.add_argument("--offset", type=int, metavar="N", default=0, help="skip the first N problems (default: 0)")
    add_kv_arguments(
        parser, methods="rkv,snapkv,h2o,streamingllm,keydiff,triattention", budgets="128,256", buffer=128,
        buffer_help="tokens decoded between two compressions. Short answers need a small buffer, or the "
                    "cache is hardly ever compressed: for GSM8K (answers of 150-400 tokens) use "
                    "--kv-buffer 32, which compresses every 32 tokens once the budget is reached; long "
                    "MATH/AIME answers can keep the paper's 128")
    parser.add_argument("--max-tokens", type=int, metavar="N", default=0,
                        help="most tokens per answer (default: gsm8k 1024, math 4096, aime 16384; capped by "
                             "the model's training context)")
    parser.add_argument("--temperature", type=float, metavar="T", default=0.0,
                        help="0: greedy (default); the paper samples at 0.6")
    parser.add_argument("--top-p", type=float, metavar="P", default=0.95, help="nucleus sampling when sampling (default: %(default)s)")
    parser.add_argument("--paper-sampling", action="store_true",
                        help="sample as the R-KV paper: temperature 0.6, top-p 0.95")
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="base seed; problem i uses seed + i (default: 0)")
    parser.add_argument("--prompt", metavar="TEXT", default=PROMPT_SUFFIX,
                        help="instruction appended to each problem (default: the paper's)")
    parser.add_argument("--parallel", type=int, metavar="S", default=1,
                        help="problems answered at once, decoded together in one context (each with its own "
                             "KV cache and budget); greedy answers equal those of a one-at-a-time run "
                             "(default: %(default)s, one at a time)")
    parser.add_argument("--out", type=Path, metavar="DIR", default=Path("tasks-out"), help="output folder (default: %(default)s)")


def load_done(path: Path, run_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """Finished (config label, item key) -> record of this run id; torn lines are ignored."""
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("run_id") == run_id:
                done[(rec["config"], rec["item"])] = rec
    return done


def append_record(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":   # an interrupted write left a torn line: start a new one
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def summarize(records: list[dict[str, Any]], configs: list[RunConfig]) -> list[dict[str, Any]]:
    rows = []
    for cfg in configs:
        recs = [r for r in records if r["config"] == cfg.label]
        n = len(recs)

        def mean(field):
            values = [r[field] for r in recs if r.get(field) is not None]
            return sum(values) / len(values) if values else None

        rows.append({
            **cfg.to_dict(), "n": n,
            "correct": sum(bool(r["correct"]) for r in recs),
            "accuracy": (sum(bool(r["correct"]) for r in recs) / n) if n else None,
            "no_answer": sum(r["prediction"] is None for r in recs),
            "truncated": sum(r["finish_reason"] == "length" for r in recs),
            "mean_tokens": mean("completion_tokens"), "mean_compressions": mean("compressions"),
            "mean_seconds": mean("seconds"),
            "tokens_per_second": (sum(r["completion_tokens"] for r in recs) / sum(r["seconds"] for r in recs))
            if n and sum(r["seconds"] for r in recs) > 0 else None,
        })
    full = next((r for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["accuracy_minus_full"] = (r["accuracy"] - full["accuracy"]) \
            if full and full["accuracy"] is not None and r["accuracy"] is not None else None
    return rows


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    headers = ["config", "problems", "accuracy", "vs full (points)", "no answer", "truncated", "mean tokens",
               "mean compressions", "tok/s (with prefill)"]
    rows = []
    for r in result["summary"]:
        rows.append([
            r["label"], r["n"], None if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
            None if r["accuracy_minus_full"] is None or r["method"] == "full"
            else f"{100 * r['accuracy_minus_full']:+.1f}",
            r["no_answer"], r["truncated"], r["mean_tokens"], r["mean_compressions"], r["tokens_per_second"],
        ])
    sampling = "greedy" if not s["temperature"] else f"temperature {s['temperature']}, top-p {s['top_p']}"
    head = (f"Task {s['task']} (`{s['data']}`, problems {s['offset']}–{s['offset'] + s['n_items'] - 1}), model "
            f"`{s['model']}`, {sampling}, at most {s['max_tokens']} tokens per answer, kv_buffer {s['kv_buffer']}; "
            f"prompt: \"{s['prompt']}\". 'truncated': answers that reached the token limit.\n\n")
    return head + markdown_table(headers, rows)


def answer_one_at_a_time(model_path: Path, todo: list[tuple[int, dict[str, Any], RunConfig]], answer: Callable,
                         keep: Callable, llm_settings: dict[str, Any]) -> None:
    """Problems in the outer loop, configurations inside: a partial run compares them all."""
    instances: dict[str, Any] = {}
    try:
        for i, row, cfg in todo:
            llm = instances.get(cfg.label)
            if llm is None:
                llm = instances[cfg.label] = open_llama(model_path, cfg, **llm_settings)
            clear_cache(llm)
            keep(answer(llm, i, row, cfg))
    finally:
        for llm in instances.values():
            llm.close()


def answer_in_parallel(model_path: Path, todo: list[tuple[int, dict[str, Any], RunConfig]],
                       configs: list[RunConfig], answer: Callable, keep: Callable, parallel: int,
                       llm_settings: dict[str, Any]) -> None:
    """One configuration at a time, its problems `parallel` at once in one batched context."""
    for cfg in configs:
        mine = [(i, row) for i, row, c in todo if c == cfg]
        if not mine:
            continue
        with open_batched(model_path, cfg, n_seq_max=min(parallel, len(mine)), **llm_settings) as batch:
            def one(i: int, row: dict[str, Any]) -> dict[str, Any]:
                with batch.sequence() as view:
                    return answer(view, i, row, cfg)

            with ThreadPoolExecutor(max_workers=batch.n_seq_max, thread_name_prefix="rkv-task") as pool:
                for future in as_completed([pool.submit(one, i, row) for i, row in mine]):
                    keep(future.result())


def run(args: argparse.Namespace) -> int:
    model_path = resolve(args.model)
    if not args.data.exists():
        raise SystemExit(f"error: {args.data} does not exist")
    rows = read_jsonl(args.data)
    task = detect_task(args.data, rows) if args.task == "auto" else args.task
    items = list(enumerate(rows))[args.offset:]
    if args.limit:
        items = items[:args.limit]
    if not items:
        raise SystemExit("error: no problems selected")
    if args.parallel < 1:
        raise SystemExit(f"error: --parallel must be at least 1, got {args.parallel}")
    if args.paper_sampling:
        args.temperature, args.top_p = 0.6, 0.95
    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[task]
    configs = configs_from_args(args, include_full=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE

    # prompts, tokenized with a throwaway model; the context every configuration gets
    probe = open_llama(model_path, RunConfig("full"), n_ctx=256, threads=args.threads)
    try:
        template = ChatTemplate(probe)
        prompts = {i: template.tokens(template.render(
            [{"role": "user", "content": item_question(row) + "\n" + args.prompt}])) for i, row in items}
        n_ctx_train = probe._model.n_ctx_train()
    finally:
        probe.close()
    n_ctx = min(n_ctx_train, max(len(p) for p in prompts.values()) + max_tokens + 1)
    if n_ctx < max(len(p) for p in prompts.values()) + max_tokens + 1:
        log(f"warning: answers are capped by the model's training context ({n_ctx_train} tokens)")

    run_settings = {
        "model": model_path.name, "model_digest": file_digest(model_path), "data": args.data.name, "task": task,
        "max_tokens": max_tokens, "temperature": args.temperature, "flash_attn": True,
        "top_p": args.top_p if args.temperature else None, "seed": args.seed, "prompt": args.prompt,
    }
    run_id = hashlib.sha256(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()[:12]
    done = load_done(results_path, run_id)
    keys = {i: item_key(i, row) for i, row in items}
    todo = [(i, row, cfg) for i, row in items for cfg in configs if (cfg.label, keys[i]) not in done]
    skipped = len(items) * len(configs) - len(todo)
    if skipped:
        log(f"tasks: resuming run {run_id}: {skipped} of {len(items) * len(configs)} answers already in {results_path}")

    def answer(llm: Any, i: int, row: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
        before = llm.kv_stats()
        t0 = time.perf_counter()
        response = llm.create_completion(
            prompt=prompts[i], max_tokens=max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=0, min_p=0.0, repeat_penalty=1.0, seed=args.seed + i,
        )
        seconds = time.perf_counter() - t0
        stats = llm.kv_stats()
        choice = response["choices"][0]
        text = choice["text"]
        prediction = extract_answer(text, task)
        gold = gold_answer(row, task)
        return {
            "run_id": run_id, "config": cfg.label, "method": cfg.method, "budget": cfg.budget,
            "buffer": cfg.buffer if cfg.method != "full" else None, "item": keys[i], "index": i,
            "id": row.get("unique_id", row.get("id", i)), "gold": gold, "prediction": prediction,
            "correct": is_equivalent(prediction, gold), "finish_reason": choice.get("finish_reason"),
            "prompt_tokens": response["usage"]["prompt_tokens"],
            "completion_tokens": response["usage"]["completion_tokens"], "seconds": seconds,
            "compressions": stats.compressions - before.compressions,
            "compress_seconds": stats.compress_seconds - before.compress_seconds,
            "cells_peak": stats.cells_peak, "kv_bytes_used": stats.kv_bytes_used,
            "kv_bytes_full": stats.kv_bytes_full, "text": text,
        }

    progress = progress_bar(len(todo), f"tasks: {task} (answers)")

    def keep(record: dict[str, Any]) -> None:
        append_record(results_path, record)
        done[(record["config"], record["item"])] = record
        progress.set_postfix_str(f"{record['config']} #{record['index']}: "
                                 f"{'right' if record['correct'] else 'wrong'} ({record['completion_tokens']} tokens)",
                                 refresh=False)
        progress.update(1)

    llm_settings = dict(n_ctx=n_ctx, threads=args.threads, n_gpu_layers=args.n_gpu_layers)
    try:
        if args.parallel > 1:
            answer_in_parallel(model_path, todo, configs, answer, keep, args.parallel, llm_settings)
        else:
            # flash attention, as BatchedLlama uses: the greedy answers of both paths are then the same
            answer_one_at_a_time(model_path, todo, answer, keep, dict(llm_settings, seed=args.seed, flash_attn=True))
    finally:
        progress.close()

    selected = set(keys.values())
    records = [r for (label, key), r in done.items() if key in selected]
    result = {
        "settings": {**run_settings, "run_id": run_id, "n_ctx": n_ctx, "data_path": str(args.data), "offset": args.offset,
                     "n_items": len(items), "methods": args.methods, "budgets": args.budgets,
                     "kv_buffer": args.kv_buffer, "kv_window": args.kv_window, "kv_lambda": args.kv_lambda,
                     "threads": args.threads, "n_gpu_layers": args.n_gpu_layers,
                     "configs": [c.to_dict() for c in configs], "results_file": RESULTS_FILE,
                     "skipped": skipped},
        "machine": machine_info(args.threads, args.n_gpu_layers),
        "summary": summarize(records, configs),
    }
    write_results("tasks", result, render_markdown(result), out, results_path)
    return 0
