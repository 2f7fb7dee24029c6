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


def throughput(data: dict) -> str:
    lines = ["\n| row | sequences | cells each | KV GiB | decode tok/s (all) | per sequence | compressions |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['row']} | {r['n_seq']} | {r['cells_per_seq']} | {r['kv_gib']:.2f} | {r['tps']:.1f} | "
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
