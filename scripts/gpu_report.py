"""Markdown for scripts/gpu_check.sh's summary from a benchmark's JSON, and its line of results.jsonl.

    python scripts/gpu_report.py compression|throughput FILE.json NAME RESULTS.jsonl
"""
from __future__ import annotations

import json
import sys


def compression(data: dict) -> str:
    lines = [f"\n{data['model']}: B = {data['budget']}, b = {data['buffer']}; a full cache of B + b tokens "
             f"decodes at {data['limit_ms_per_token']:.2f} ms/token\n",
             "| config | path | ms/compression (max) | decode ms/token | share of decode | x limit |",
             "|---|---|---|---|---|---|"]
    for r in data["configs"]:
        lines.append(f"| {r['config']} | {r['redundancy_path']} | {r['compression_ms_mean']:.1f} "
                     f"({r['compression_ms_max']:.0f}) | {r['decode_ms_per_token']:.2f} | "
                     f"{100 * r['share_of_decode']:.1f}% | {100 * r['share_of_limit']:.0f}% |")
    return "\n".join(lines) + "\n"


def kv_memory(plan: dict) -> str:
    """How the KV memory of the rows was chosen (bench_steady_throughput.py's kv_memory)."""
    device = (f"{plan['device']}: {plan['total_gib']:.1f} GiB, {plan['free_before_load_gib']:.1f} free before the "
              f"weights ({plan['weights_gib']:.2f} GiB), {plan['free_after_load_gib']:.1f} after")
    if plan["bound"] == "given":
        return f"\nKV memory {plan['kv_memory_gib']:.2f} GiB, given; {device}"
    cap = f"at most {plan['max_gib']:g} GiB" if plan["max_gib"] > 0 else "no cap"
    return (f"\nKV memory {plan['kv_memory_gib']:.2f} GiB: the free memory after the weights less "
            f"{plan['reserve_gib']:.2f} GiB for compute buffers, {cap} (bound: {plan['bound']}); {device}")


def throughput(data: dict) -> str:
    lines = [kv_memory(data["kv_memory"])] if "kv_memory" in data else []
    lines += ["\n| row | sequences | cells each | KV GiB | decode tok/s (all) | per sequence | compressions |",
              "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        fewer = f" (of {r['n_seq_planned']} planned)" if r.get("n_seq_planned", r["n_seq"]) != r["n_seq"] else ""
        lines.append(f"| {r['row']} | {r['n_seq']}{fewer} | {r['cells_per_seq']} | {r['kv_gib']:.2f} | {r['tps']:.1f} | "
                     f"{r['per_seq_tps']:.2f} | {r['compressions']} |")
    by = {r["row"]: r for r in data["rows"]}
    paper = data["paper"]
    lines.append(f"| paper: A100, R1-Llama-8B, 16K (full / rkv) | {paper['full']['n_seq']} / {paper['rkv']['n_seq']} "
                 f"| | | {paper['full']['tps']} / {paper['rkv']['tps']} | | |")
    if "full" in by and "rkv" in by:
        lines.append(f"\nrkv / full: {by['rkv']['tps'] / by['full']['tps']:.2f}x "
                     f"(paper: {paper['rkv']['tps'] / paper['full']['tps']:.2f}x)")
    return "\n".join(lines) + "\n"


def main() -> None:
    kind, path, name, results = sys.argv[1:5]
    with open(path) as f:
        data = json.load(f)
    print({"compression": compression, "throughput": throughput}[kind](data))
    with open(results, "a") as f:
        f.write(json.dumps({"step": f"{kind} {name}", "figures": data}) + "\n")


if __name__ == "__main__":
    main()
