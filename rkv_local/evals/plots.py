"""PNG plots of the ``bench``, ``eval fidelity`` and ``eval tasks`` results (matplotlib, Agg)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

MIB = 2**20
COLORS = {"full": "black", "rkv": "tab:red", "snapkv": "tab:blue", "h2o": "tab:green",
          "streamingllm": "tab:orange", "keydiff": "tab:purple", "triattention": "tab:brown"}
MARKERS = {"full": "s", "rkv": "o", "snapkv": "^", "h2o": "v", "streamingllm": "D", "keydiff": "P", "triattention": "X"}
LINESTYLES = ["-", "--", ":", "-."]


def available() -> bool:
    """Whether matplotlib can be imported (the commands skip their plots, with a warning, if not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(kind: str, result: dict[str, Any], out: Path) -> list[Path]:
    """The PNGs of ``kind`` (bench, fidelity, tasks); none, with a warning, without matplotlib."""
    if not available():
        import sys

        print("warning: matplotlib is not installed, so no plots were written (pip install matplotlib)",
              file=sys.stderr)
        return []
    plot = {"bench": plot_bench, "fidelity": plot_fidelity, "tasks": plot_accuracy, "throughput": plot_throughput}
    return plot[kind](result, out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, title: Optional[str] = None) -> Path:
    """Lay out, write and release one figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _style(label: str, method: str, index: int = 0) -> dict[str, Any]:
    return {"color": COLORS.get(method, None), "marker": MARKERS.get(method, "o"),
            "linestyle": LINESTYLES[index % len(LINESTYLES)], "label": label}


def _log2_axis(ax, values) -> None:
    values = sorted({v for v in values if v})
    if not values:
        return
    if len(values) > 1 and values[-1] / values[0] >= 4:
        ax.set_xscale("log", base=2)
    if len(values) == 1:
        ax.set_xlim(values[0] * 0.8, values[0] * 1.25)
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v // 1024}K" if v >= 1024 and v % 1024 == 0 else str(v) for v in values])
    ax.minorticks_off()


def _configs(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["label"], r["method"])
    return sorted(seen.items(), key=lambda kv: (kv[1] != "full", kv[1], kv[0]))


def plot_bench(result: dict[str, Any], out: Path) -> list[Path]:
    """``bench_speed.png`` (decode tokens/s vs length; speed along the longest run) and
    ``bench_memory.png`` (K/V bytes and peak RSS growth vs length)."""
    plt = _pyplot()
    rows = result["summary"]
    model = result["settings"]["model"]
    configs = _configs(rows)
    method_count: dict[str, int] = {}
    styles = {}
    for label, method in configs:
        styles[label] = _style(label, method, method_count.get(method, 0))
        method_count[method] = method_count.get(method, 0) + 1
    lengths = [r["length"] for r in rows]
    paths = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, _ in configs:
        pts = sorted((r["length"], r["decode_tps"]) for r in rows if r["label"] == label and r["decode_tps"])
        if pts:
            ax1.plot(*zip(*pts), **styles[label])
    _log2_axis(ax1, lengths)
    ax1.set_xlabel("generated tokens")
    ax1.set_ylabel("decode tokens/s (whole run)")
    ax1.set_ylim(bottom=0)
    ax1.set_title("decode throughput vs generated length")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    longest = max(lengths) if lengths else 0
    for label, _ in configs:
        run = next((r for r in result["runs"] if r["label"] == label and r["length"] == longest), None)
        if not run or not run["checkpoints"]:
            continue
        xs, ys, prev_n, prev_t = [], [], 0, 0.0
        for c in run["checkpoints"]:
            dt = c["seconds"] - prev_t
            if dt > 0 and c["generated"] > prev_n:
                xs.append(c["generated"])
                ys.append((c["generated"] - prev_n) / dt)
            prev_n, prev_t = c["generated"], c["seconds"]
        style = dict(styles[label])
        style["marker"] = None
        ax2.plot(xs, ys, **style)
    ax2.set_xlabel("generated tokens")
    ax2.set_ylabel("decode tokens/s (per interval)")
    ax2.set_ylim(bottom=0)
    ax2.set_title(f"speed along the {longest}-token run")
    ax2.grid(alpha=0.3)
    paths.append(_save(fig, out / "bench_speed.png", model))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, _ in configs:
        pts = sorted((r["length"], r["kv_bytes_used"] / MIB) for r in rows
                     if r["label"] == label and r["kv_bytes_used"] is not None)
        if pts:
            ax1.plot(*zip(*pts), **styles[label])
        pts = sorted((r["length"], r["peak_rss_delta_bytes"] / MIB) for r in rows
                     if r["label"] == label and r["peak_rss_delta_bytes"] is not None)
        if pts:
            ax2.plot(*zip(*pts), **styles[label])
    for ax, title, ylabel in ((ax1, "K/V cache in use", "K/V MiB"),
                              (ax2, "peak resident memory growth during the run", "peak RSS Δ MiB")):
        _log2_axis(ax, lengths)
        ax.set_xlabel("generated tokens")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "bench_memory.png", model))
    return paths


def plot_fidelity(result: dict[str, Any], out: Path) -> list[Path]:
    """``fidelity.png``: after the first compression, same top-1, the KLD's mean and percentiles (as
    llama-perplexity reports them) and ΔNLL vs budget, one curve per method (and sweep setting)."""
    plt = _pyplot()
    rows = [r for r in result["summary"] if r["method"] != "full" and r.get("stats_compressed")]
    if not rows:
        return []
    budgets = [r["budget"] for r in rows]
    panels = [("same_top1", "same top-1 token as the full cache", "fraction", False),
              ("kld_mean", "mean KLD(full ‖ compressed)", "nats / token", True),
              ("kld_median", "median KLD", "nats / token", True),
              ("kld_p99", "99th-percentile KLD", "nats / token", True),
              ("kld_p99_9", "99.9th-percentile KLD", "nats / token", True),
              ("nll_diff", "ΔNLL = ln PPL ratio (compressed − full)", "nats / token", False)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (field, title, ylabel, log_scale) in zip(axes.flat, panels):
        for index, series in enumerate(dict.fromkeys(r["series"] for r in rows)):
            pts = sorted((r["budget"], r["stats_compressed"][field]) for r in rows if r["series"] == series)
            method = series.split(",")[0]
            ax.plot(*zip(*pts), **_style(series, method, 0 if series == method else index))
        _log2_axis(ax, budgets)
        if log_scale and all(r["stats_compressed"][field] > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("KV budget (tokens per layer and head)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    s = result["settings"]
    return [_save(fig, out / "fidelity.png", f"{s['model']}: after the first compression, teacher-forced over "
                  f"{s['n_texts']} text(s) of {s['length']} tokens (kv_buffer {s['kv_buffer']})")]


def plot_accuracy(result: dict[str, Any], out: Path) -> list[Path]:
    """``tasks_accuracy.png``: accuracy vs budget per method, the full cache as a dashed line;
    bars are ±1 binomial standard error."""
    plt = _pyplot()
    rows = result["summary"]
    budgets = [r["budget"] for r in rows if r["budget"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))

    def se(r):
        n = r["n"]
        return math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n) if n else 0.0

    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full"))
    for k, method in enumerate(methods):
        pts = sorted((r["budget"], r["accuracy"], se(r)) for r in rows
                     if r["method"] == method and r["accuracy"] is not None)
        if pts:
            xs, ys, es = zip(*pts)
            dodge = 2 ** (0.04 * (k - (len(methods) - 1) / 2))   # side by side, so error bars stay apart
            ax.errorbar([x * dodge for x in xs], ys, yerr=es, capsize=3, **_style(method, method))
    full = next((r for r in rows if r["method"] == "full" and r["accuracy"] is not None), None)
    if full is not None:
        ax.axhline(full["accuracy"], color="black", linestyle="--", linewidth=1.2,
                   label=f"full cache ({100 * full['accuracy']:.1f}%)")
    _log2_axis(ax, budgets)
    ax.set_ylim(0, 1)
    ax.set_xlabel("KV budget (tokens per layer and head)")
    ax.set_ylabel("accuracy")
    s = result["settings"]
    n = max((r["n"] for r in rows), default=0)
    ax.set_title(f"{s['task']} ({n} items), {s['model']}\nkv_buffer {s['kv_buffer']}, "
                 f"{'greedy' if not s['temperature'] else 'T=%g, top-p %g' % (s['temperature'], s['top_p'])}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out / "tasks_accuracy.png")]


def plot_throughput(result: dict[str, Any], out: Path) -> list[Path]:
    """``throughput.png``: aggregate generated tokens/s against the number of sequences, one panel per
    trace length, one line per configuration (and the short-cache limit)."""
    plt = _pyplot()
    rows = result["rows"]
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for label in dict.fromkeys(r["label"] for r in rows if r["length"] == length):
            pts = sorted((r["n_seq"], r["aggregate_tps"]) for r in rows if r["length"] == length and r["label"] == label)
            method = "full" if label.startswith(("full", "limit")) else label.split("@")[0]
            style = _style(label, method, 1 if label.startswith("limit") else 0)
            ax.plot(*zip(*pts), **style)
        _log2_axis(ax, [r["n_seq"] for r in rows if r["length"] == length])
        ax.set_xlabel("sequences decoded together")
        ax.set_ylabel("generated tokens/s (all sequences)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"traces of {length} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [_save(fig, out / "throughput.png", result["settings"]["model"])]
