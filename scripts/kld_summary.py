"""Condensed Markdown tables of `eval fidelity` results, one per figure, for RESULTS.md: methods as
rows, budgets as columns, after the first compression.

    python scripts/kld_summary.py results/kld-smollm2-4k [more result folders] [--figures kld_mean,kld_p99]
    python scripts/kld_summary.py results/kld-* --advise 0.1,0.5   # smallest budgets, as `--advise` picks them
    python scripts/kld_summary.py results/kld-smollm2-4k --repeats   # mean KLD inside and outside repeated text
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rkv_local.evals import fidelity
from rkv_local.evals.report import markdown_table

TITLES = {"kld_mean": "mean KLD (± SE)", "kld_median": "median KLD", "kld_p99": "99th-percentile KLD",
          "kld_p99_9": "99.9th-percentile KLD", "kld_max": "maximum KLD", "same_top1": "same top-1 % (± SE)",
          "dp_rms": "RMS Δp %", "nll_diff": "ΔNLL (± SE)"}


def cell(stats: dict, figure: str, gap: dict) -> str:
    value = stats[figure]
    if figure in ("same_top1", "dp_rms"):
        text = f"{100 * value:.2f}"
    else:
        text = f"{value:.3g}"
    error = stats.get(f"{figure}_error")
    if error is not None and figure != "dp_rms":
        text += f" ± {100 * error:.2f}" if figure == "same_top1" else f" ± {error:.2g}"
    if figure == "kld_mean" and gap:
        # the best at this budget in bold; a gap within two paired standard errors in italics
        if gap["best"] == gap["label"]:
            text = f"**{text}**"
        elif gap["kld_vs_best"] < 2 * gap["kld_vs_best_error"]:
            text = f"*{text}*"
    return text


def table(result: dict, figure: str) -> str:
    rows = [r for r in result["summary"] if r["method"] != "full" and r.get("stats_compressed")]
    budgets = sorted({r["budget"] for r in rows})
    series = list(dict.fromkeys(r["series"] for r in rows))
    by = {(r["series"], r["budget"]): r for r in rows}
    body = []
    for name in series:
        line = [name]
        for b in budgets:
            r = by.get((name, b))
            gap = {k: r[k] for k in ("best", "kld_vs_best", "kld_vs_best_error") if k in r} if r else {}
            line.append(cell(r["stats_compressed"], figure, {**gap, "label": r["label"]} if gap else {}) if r else "–")
        body.append(line)
    return markdown_table(["method", *(f"B = {b}" for b in budgets)], body)


def advice_table(results: list[dict], targets: list[float]) -> str:
    """Per model and method, the smallest budget whose 99th-percentile KLD meets each target."""
    rows = []
    for result in results:
        for target in targets:
            args = argparse.Namespace(max_p99_kld=target, min_same_top1=None, context=[])
            picks = fidelity.advice(result["summary"], args, 0.0)
            rows.append([result["settings"]["model"], target,
                         *(a["budget"] if a["budget"] is not None else "> " + str(max(a["tried"])) for a in picks)])
    series = [a["series"] for a in fidelity.advice(results[0]["summary"], argparse.Namespace(
        max_p99_kld=0, min_same_top1=None, context=[]), 0.0)]
    return markdown_table(["model", "p99 KLD ≤", *series], rows)


def repeated_positions(tokens: list[int], n: int = 8, within: int = 512) -> np.ndarray:
    """Per position p (predicting token p + 1): whether the n tokens ending at p + 1 already occurred
    in the previous ``within`` tokens, i.e. the model is copying text it wrote (a loop)."""
    repeated = np.zeros(len(tokens), dtype=bool)
    last: dict[tuple, int] = {}
    for end in range(n, len(tokens) + 1):
        gram = tuple(tokens[end - n:end])
        if gram in last and end - last[gram] <= within:
            repeated[end - 2] = True
        last[gram] = end
    return repeated


def repeats_table(folder: Path, result: dict) -> str:
    """Mean KLD after compression (± SE) over positions outside and inside repeated text."""
    tokens = json.loads((folder / "fidelity_texts.json").read_text())["texts"][0]["tokens"]
    repeated = repeated_positions(tokens)
    arrays = np.load(folder / "fidelity_positions.npz")
    rows = []
    for r in result["summary"]:
        if r["method"] == "full":
            continue
        pos = arrays[f"{r['label']}/position"].astype(np.int64)
        kld = arrays[f"{r['label']}/kld"]
        after = pos >= r["budget"] + r["buffer"]
        cells = []
        for inside in (False, True):
            k = kld[after & (repeated[pos] == inside)]
            se = k.std() / np.sqrt(len(k) - 1) if len(k) > 10 else float("nan")
            cells.append(f"{k.mean():.3g} ± {se:.2g} ({len(k)})" if len(k) else "–")
        rows.append([r["label"], *cells])
    return markdown_table(["config", "outside repeats: mean KLD (positions)", "inside repeats"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--figures", default="kld_mean,kld_p99,same_top1")
    ap.add_argument("--advise", default=None, metavar="X,Y", help="targets of the 99th-percentile KLD")
    ap.add_argument("--repeats", action="store_true",
                    help="mean KLD outside and inside repeated text (8 tokens seen in the last 512); needs the "
                         "run's fidelity_positions.npz")
    args = ap.parse_args()
    if args.repeats:
        for folder in args.folders:
            print(repeats_table(folder, json.loads((folder / "fidelity.json").read_text())))
        return 0
    if args.advise:
        results = [json.loads((folder / "fidelity.json").read_text()) for folder in args.folders]
        print(advice_table(results, [float(x) for x in args.advise.split(",")]))
        return 0
    for folder in args.folders:
        result = json.loads((folder / "fidelity.json").read_text())
        s = result["settings"]
        positions = max((r["positions_compressed"] for r in result["summary"]), default=0)
        print(f"#### {s['model']}: {s['n_texts']} text(s) of {s['length']} tokens "
              f"({'T = ' + str(s['temperature']) if s['temperature'] > 0 else 'greedy'}), "
              f"up to {positions} positions after compression\n")
        for figure in args.figures.split(","):
            print(f"{TITLES[figure]}:\n\n{table(result, figure)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
