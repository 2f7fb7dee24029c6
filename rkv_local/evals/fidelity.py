"""Fidelity of compressed KV caches against the full cache, in the statistics llama.cpp uses to
judge a changed model (``llama-perplexity --kl-divergence``, see ``kld.py``).

Texts. The full-cache model answers reasoning problems from `--data` (default: the shipped
MATH-500) in one chat with the model's chat template and the paper's prompt, greedily or sampled
at `--temperature` (top-p `--top-p`, seeded);
problems are asked one after another until the conversation reaches `--length` tokens (an
answer is cut at `--max-answer-tokens`). The texts are cached in `--out` (`fidelity_texts.json`)
and reused while the model, data and settings match (`--regenerate` makes them anew).

Scoring. Every configuration reads the same token sequence in chunks (`--chunk`; by default the
greatest common divisor of `--kv-buffer` and the budgets, so that every cache is compressed
exactly when it holds budget + buffer cells, as in token-by-token decoding), in lockstep with a
full-cache reference. At each position whose next token the model wrote, it compares the
next-token distributions: KL(full ‖ compressed), the same top-1 token, and the probability and
negative log-likelihood of the actual next token, summarised as llama-perplexity does (mean KLD ±
its standard error, median, 90/95/99/99.9th percentiles and maximum; same top-1 ± error; mean and
RMS Δp; ΔNLL = ln PPL ratio), over all scored positions and over the positions after the cache's
first compression (position ≥ budget + buffer), where the configurations differ at all.

Free running (`--free-running N`). Each configuration answers N problems on its own, greedily;
the table gives the tokens until its answer first differs from the full cache's and the answer's
length against the full cache's, as distributions over the problems.

Advice (`--advise`). After scoring, the smallest budget of each method whose 99th-percentile
KLD (after compression) is at most `--max-p99-kld` (and same top-1 at least `--min-same-top1`),
with the K/V memory it takes at `--context` tokens against the full cache.

Outputs in `--out`: `fidelity.json`, `fidelity.md`, `fidelity.png`, and every configuration's
per-position figures in `fidelity_positions.npz` (keys ``LABEL/kld`` and so on).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tqdm import tqdm

from ..llama import padded_cells
from ..settings import KVSettings
from .datasets import data_path, read_jsonl
from .decoding import ChatTemplate, clear_cache, eog_tokens, eval_all_logits, greedy_token
from .kld import KLDStats, PositionFigures, compare_positions, kld_statistics, log_softmax, mean_and_error
from .measure import machine_info
from .report import file_digest, log, markdown_table, progress_bar, write_json, write_results
from .runs import (RunConfig, add_kv_arguments, add_model_arguments, build_configs, configs_from_args, open_llama,
                   parse_int_list, resolve)
from .tasks import PROMPT_SUFFIX, item_question

HELP = "KL divergence statistics (as llama-perplexity's) of compressed caches vs the full cache, and budget advice"
EXAMPLE = ("example:\n  rkv-local eval fidelity qwen2.5-coder-0.5b --budgets 64,256,1024\n"
           "  rkv-local eval fidelity model.gguf --advise --max-p99-kld 0.1")
MIB = 2**20
# --quick: a first look in a minute or two, and what the tests run
QUICK = dict(texts=1, length=448, max_answer_tokens=256, budgets=[32, 64], kv_buffer=32)
# --advise: one text long enough that a budget of 1024 is compressed for half of it
ADVISE = dict(texts=1, length=2304)

BIN = 256  # positions per bin of the per-position curves in fidelity.json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_kv_arguments(parser, methods="full,rkv,snapkv,h2o,streamingllm,keydiff,triattention", budgets="64,128,256,512,1024")
    parser.add_argument("--data", type=data_path, metavar="NAME|FILE", default=data_path("math500"),
                        help="a shipped benchmark (gsm8k, math500, aime24) or a JSONL file of problems "
                             "(question or problem field; default: math500)")
    parser.add_argument("--texts", type=int, metavar="N", default=None,
                        help="number of texts (0: free running only; default: 2, 1 with --advise)")
    parser.add_argument("--length", type=int, metavar="N", default=None,
                        help=f"tokens per text (default: 3072, {ADVISE['length']} with --advise)")
    parser.add_argument("--temperature", type=float, metavar="T", default=0.0,
                        help="sample the texts at this temperature (default: 0, greedy; reasoning models are run at 0.6)")
    parser.add_argument("--top-p", type=float, metavar="P", default=0.95,
                        help="nucleus sampling of the texts when --temperature > 0 (default: %(default)s)")
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="sampling seed of the texts (default: %(default)s)")
    parser.add_argument("--max-answer-tokens", type=int, metavar="N", default=2048,
                        help="cut one answer after this many tokens (default: %(default)s)")
    parser.add_argument("--first-item", type=int, metavar="N", default=0,
                        help="index of the first problem in --data (default: %(default)s)")
    parser.add_argument("--chunk", type=int, metavar="N", default=0,
                        help="tokens per decode call while scoring (default: gcd of --kv-buffer and the budgets)")
    parser.add_argument("--regenerate", action="store_true", help="generate the texts again even if cached")
    parser.add_argument("--lambdas", type=parse_float_list, metavar="LIST", default=None,
                        help="also score rkv at each budget with each of these λ (a sweep; e.g. 0,0.1,0.3,0.5,1)")
    parser.add_argument("--windows", type=parse_int_list, metavar="LIST", default=None,
                        help="also score rkv at each budget with each of these observation windows (e.g. 4,8,16,32)")
    parser.add_argument("--free-running", type=int, metavar="N", default=0,
                        help="also let every configuration answer N problems on its own and report where its answer "
                             "leaves the full cache's and how long it is (default: off)")
    parser.add_argument("--advise", action="store_true",
                        help="a short run (one text) that ends with the smallest budget per method meeting --max-p99-kld "
                             "and --min-same-top1")
    parser.add_argument("--max-p99-kld", type=float, metavar="X", default=0.1,
                        help="--advise: largest acceptable 99th-percentile KLD after compression, nats (default: %(default)s)")
    parser.add_argument("--min-same-top1", type=float, metavar="PCT", default=None,
                        help="--advise: smallest acceptable same-top-1 rate after compression, in %% (default: no limit)")
    parser.add_argument("--context", type=parse_int_list, metavar="N", default=[32768],
                        help="--advise: the context lengths the memory figures are given for (default: 32k)")
    parser.add_argument("--quick", action="store_true",
                        help="a first look in a minute or two: one text of 448 tokens, budgets 32 and 64, kv_buffer 32")
    parser.add_argument("--out", type=Path, metavar="DIR", default=Path("fidelity-out"), help="output folder (default: %(default)s)")


def parse_float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in str(text).replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def settle_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in what --quick and --advise decide, and refuse what cannot run."""
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    defaults = ADVISE if args.advise else {"texts": 2, "length": 3072}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.texts < 0 or args.free_running < 0:
        raise SystemExit("error: --texts and --free-running must not be negative")
    if args.texts == 0 and not args.free_running:
        raise SystemExit("error: --texts 0 scores nothing; add --free-running N")
    if args.advise and not args.texts:
        raise SystemExit("error: --advise needs at least one text")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SystemExit("error: --temperature must be ≥ 0 and --top-p in (0, 1]")
    for lam in args.lambdas or []:
        try:
            KVSettings(kv_lambda=lam)
        except ValueError as exc:
            raise SystemExit(f"error: --lambdas: {exc}") from None
    return args


# ---------------------------------------------------------------------------
# Texts: the full-cache model's own answers
# ---------------------------------------------------------------------------


def turn_separator(template: ChatTemplate) -> str:
    """What the template writes between an assistant answer and the next user turn's generation
    prompt, with ``QQ2QQ`` standing for the user's text (found by rendering placeholder turns)."""
    a = template.render([{"role": "user", "content": "QQ1QQ"}])
    b = template.render([{"role": "user", "content": "QQ1QQ"}, {"role": "assistant", "content": "AA1AA"},
                         {"role": "user", "content": "QQ2QQ"}])
    if not b.startswith(a + "AA1AA") or b.count("QQ2QQ") != 1:
        raise SystemExit("error: cannot continue a conversation with this chat template")
    return b[len(a) + len("AA1AA"):]


def make_texts(model_path: Path, rows: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    llm = open_llama(model_path, RunConfig("full"), n_ctx=padded_cells(args.length + 8),
                     threads=args.threads, n_gpu_layers=args.n_gpu_layers, seed=args.seed)
    try:
        template = ChatTemplate(llm)
        separator = turn_separator(template)
        eog = set(int(t) for t in eog_tokens(llm))
        texts = []
        cursor = args.first_item
        progress = progress_bar(args.texts * args.length, "fidelity: generating texts (tokens)")
        for _ in range(args.texts):
            clear_cache(llm)
            tokens: list[int] = []
            generated: list[bool] = []
            items: list[int] = []
            answers_cut = 0
            while len(tokens) < args.length:
                index = cursor % len(rows)
                cursor += 1
                content = item_question(rows[index]) + "\n" + PROMPT_SUFFIX
                if not tokens:
                    new = template.tokens(template.render([{"role": "user", "content": content}]))
                else:
                    new = template.tokens(separator.replace("QQ2QQ", content))
                    if generated[-1] and tokens[-1] in eog and new and new[0] == tokens[-1]:
                        new = new[1:]  # the model already wrote the end-of-turn token
                room = args.length - len(tokens) - len(new)
                if room < 16:
                    break
                items.append(index)
                tokens += new
                generated += [False] * len(new)
                llm.eval(new)
                done = len(tokens)
                for _ in range(min(args.max_answer_tokens, room)):
                    tok = next_token(llm, args)
                    tokens.append(tok)
                    generated.append(True)
                    llm.eval([tok])
                    if tok in eog:
                        break
                else:
                    answers_cut += 1
                progress.update(len(tokens) - done + len(new))
            if not items:
                raise SystemExit(f"error: --length {args.length} is too short: problem {cursor - 1} of the data "
                                 f"and the chat template alone take {len(new)} tokens")
            texts.append({"items": items, "tokens": tokens, "generated": generated, "answers_cut": answers_cut,
                          "text": llm.detokenize(tokens, special=True).decode("utf-8", errors="replace")})
        progress.close()
        return texts
    finally:
        llm.close()


def next_token(llm, args) -> int:
    """The full cache's next token: greedy, or llama.cpp's sampler at the texts' temperature."""
    if args.temperature <= 0:
        return greedy_token(llm)
    return int(llm.sample(temp=args.temperature, top_p=args.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0))


def texts_key(model_path: Path, data: Path, args) -> dict[str, Any]:
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed} if args.temperature > 0 else {}
    return {
        "model": model_path.name, "model_digest": file_digest(model_path), "data": data.name,
        "data_digest": hashlib.sha256(data.read_bytes()).hexdigest()[:16], "texts": args.texts,
        "length": args.length, "max_answer_tokens": args.max_answer_tokens, "first_item": args.first_item,
        "prompt": PROMPT_SUFFIX, **sampling,
    }


def load_or_make_texts(model_path: Path, data: Path, args, out: Path) -> tuple[list[dict[str, Any]], bool]:
    """(texts, whether they came from the cache)."""
    path = out / "fidelity_texts.json"
    key = texts_key(model_path, data, args)
    if path.exists() and not args.regenerate:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return cached["texts"], True
        except (OSError, ValueError, KeyError):
            pass
    rows = read_jsonl(data)
    if not rows:
        raise SystemExit(f"error: {data} holds no problems")
    texts = make_texts(model_path, rows, args)
    write_json(path, {"key": key, "texts": texts})
    return texts, False


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


class Tally:
    """Per-position figures of one configuration, over all texts."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.position: list[np.ndarray] = []
        self.figures: list[PositionFigures] = []
        self.compressions = 0
        self.seconds = 0.0
        self.kv_bytes_used = 0
        self.bytes_per_cell = 0.0      # K/V bytes of one token of the growing cache, all layers and heads

    def add(self, positions: np.ndarray, figures: PositionFigures) -> None:
        self.position.append(positions)
        self.figures.append(figures)

    def statistics(self, select: Optional[np.ndarray] = None) -> Optional[KLDStats]:
        figures = [self.joined(name) for name in ("kld", "same_top1", "nll", "nll_base")]
        return kld_statistics(*(f if select is None else f[select] for f in figures))

    def joined(self, name: str) -> np.ndarray:
        """One per-position figure over all texts (``position``, ``kld``, ``same_top1``, ``nll``, ``nll_base``)."""
        parts = self.position if name == "position" else [getattr(f, name) for f in self.figures]
        return np.concatenate(parts) if parts else np.zeros(0)

    def compressed(self) -> np.ndarray:
        """Which positions come after the cache's first compression (none for the full cache)."""
        pos = self.joined("position")
        return pos >= self.config.budget + self.config.buffer if self.config.method != "full" else pos < 0

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        pos = self.joined("position").astype(np.int64)
        after = self.compressed()
        everywhere, compressed = self.statistics(), self.statistics(after)
        kld, agree = self.joined("kld"), self.joined("same_top1")
        diff = self.joined("nll") - self.joined("nll_base")
        bins = []
        for b0 in range(0, int(pos.max()) + 1 if len(pos) else 0, BIN):
            sel = (pos >= b0) & (pos < b0 + BIN)
            if sel.any():
                bins.append({"start": b0, "positions": int(sel.sum()), "top1": float(agree[sel].mean()),
                             "kl": float(kld[sel].mean()), "nll_diff": float(diff[sel].mean())})

        def figure(stats: Optional[KLDStats], name: str) -> Optional[float]:
            return getattr(stats, name) if stats is not None else None

        return {
            **cfg.to_dict(),
            "positions": int(len(pos)), "positions_compressed": int(after.sum()),
            "stats": everywhere.to_dict() if everywhere else None,
            "stats_compressed": compressed.to_dict() if compressed else None,
            # the headline figures under their earlier names
            "top1": figure(everywhere, "same_top1"), "kl": figure(everywhere, "kld_mean"),
            "nll_diff": figure(everywhere, "nll_diff"),
            "top1_compressed": figure(compressed, "same_top1"), "kl_compressed": figure(compressed, "kld_mean"),
            "nll_diff_compressed": figure(compressed, "nll_diff"),
            "nll_full": float(np.mean(self.joined("nll_base"))) if self.figures else None,
            "compressions": self.compressions, "seconds": self.seconds,
            "kv_bytes_used": self.kv_bytes_used, "bytes_per_cell": self.bytes_per_cell,
            "bins": bins,
        }


def paired_gaps(tallies: dict[str, Tally]) -> dict[str, dict[str, float]]:
    """Per configuration, its mean KLD after compression minus the best one's at the same budget and
    buffer, over the same positions, with the standard error of that paired difference (positions
    taken as independent, which neighbouring tokens are not: read it as a lower bound)."""
    groups: dict[tuple, list[Tally]] = {}
    for tally in tallies.values():
        if tally.config.method != "full" and tally.figures:
            groups.setdefault((tally.config.budget, tally.config.buffer), []).append(tally)
    gaps = {}
    for members in groups.values():
        members = [t for t in members if t.compressed().any()]   # a budget the texts never reach: nothing to rank
        if not members:
            continue
        means = {t.config.label: float(np.mean(t.joined("kld")[t.compressed()])) for t in members}
        best = min(members, key=lambda t: means[t.config.label])
        for t in members:
            d = t.joined("kld")[t.compressed()] - best.joined("kld")[best.compressed()]
            gaps[t.config.label] = {"best": best.config.label, "kld_vs_best": float(d.mean()),
                                    "kld_vs_best_error": mean_and_error(d)[1]}
    return gaps


def save_positions(tallies: dict[str, Tally], path: Path) -> None:
    """Every configuration's per-position figures, to recompute any statistic without scoring again."""
    arrays = {f"{label}/{name}": tally.joined(name) for label, tally in tallies.items()
              for name in ("position", "kld", "same_top1", "nll", "nll_base")}
    np.savez_compressed(path, **arrays)


def chunk_size(args) -> int:
    if args.chunk:
        return int(args.chunk)
    budgets = [b for b in args.budgets] if any(m != "full" for m in args.methods) else []
    return max(1, math.gcd(args.kv_buffer, *budgets))


def score_text(model_path: Path, text: dict[str, Any], configs: list[RunConfig], tallies: dict[str, Tally],
               chunk: int, args, progress: tqdm) -> None:
    tokens = text["tokens"]
    generated = np.asarray(text["generated"], dtype=bool)
    n = len(tokens)
    n_ctx = padded_cells(n + 1)
    ref = open_llama(model_path, RunConfig("full"), n_ctx=n_ctx, threads=args.threads,
                     n_gpu_layers=args.n_gpu_layers, n_batch=chunk)
    instances = []
    try:
        for cfg in configs:
            instances.append((cfg, open_llama(model_path, cfg, n_ctx=n_ctx, threads=args.threads,
                                              n_gpu_layers=args.n_gpu_layers, n_batch=chunk)))
        for s in range(0, n - 1, chunk):
            e = min(s + chunk, n - 1)               # positions s..e-1 predict tokens s+1..e
            piece = tokens[s:e]
            rows = np.flatnonzero(generated[s + 1:e + 1])
            targets = np.asarray(tokens[s + 1:e + 1])[rows]
            ref_logits = eval_all_logits(ref, piece)
            base = log_softmax(ref_logits[rows]) if len(rows) else None
            progress.update(1)
            for cfg, llm in instances:
                t0 = time.perf_counter()
                logits = eval_all_logits(llm, piece)
                if base is not None:
                    tallies[cfg.label].add(s + rows, compare_positions(base, logits[rows], targets))
                tallies[cfg.label].seconds += time.perf_counter() - t0
                progress.update(1)
        for cfg, llm in instances:
            stats = llm.kv_stats()
            tally = tallies[cfg.label]
            tally.compressions += stats.compressions
            tally.kv_bytes_used = max(tally.kv_bytes_used, stats.kv_bytes_used)
            tally.bytes_per_cell = stats.kv_bytes_full / max(stats.n_tokens, 1)
    finally:
        for _, llm in instances:
            llm.close()
        ref.close()


# ---------------------------------------------------------------------------
# Free running: each configuration answers on its own
# ---------------------------------------------------------------------------


def free_running(model_path: Path, rows: list[dict[str, Any]], configs: list[RunConfig], args) -> list[dict[str, Any]]:
    """Per configuration, where its greedy answers to ``--free-running`` problems leave the full
    cache's answers and how long they are."""
    n = args.free_running
    items = [(args.first_item + i) % len(rows) for i in range(n)]
    plan = [RunConfig("full")] + [c for c in configs if c.method != "full"]
    answers: dict[str, list[list[int]]] = {}
    capped: dict[str, int] = {}
    progress = progress_bar(len(plan) * n, "fidelity: free running (answers)")
    prompts: list[list[int]] = []
    for cfg in plan:
        llm = None
        try:
            if not prompts:   # the full cache opens first and renders the prompts
                llm = open_llama(model_path, cfg, n_ctx=256, threads=args.threads, n_gpu_layers=args.n_gpu_layers)
                template = ChatTemplate(llm)
                prompts = [template.tokens(template.render([{"role": "user", "content": item_question(rows[i]) + "\n"
                                                              + PROMPT_SUFFIX}])) for i in items]
                llm.close()
            n_ctx = padded_cells(max(map(len, prompts)) + args.max_answer_tokens + 8)
            llm = open_llama(model_path, cfg, n_ctx=n_ctx, threads=args.threads, n_gpu_layers=args.n_gpu_layers)
            eog = set(int(t) for t in eog_tokens(llm))
            answers[cfg.label], capped[cfg.label] = [], 0
            for prompt in prompts:
                clear_cache(llm)
                llm.eval(prompt)
                answer: list[int] = []
                while len(answer) < args.max_answer_tokens:
                    answer.append(greedy_token(llm))
                    if answer[-1] in eog:
                        break
                    llm.eval([answer[-1]])
                else:
                    capped[cfg.label] += 1
                answers[cfg.label].append(answer)
                progress.update(1)
        finally:
            if llm is not None:
                llm.close()
    progress.close()
    full = answers["full"]
    result = []
    for cfg in plan[1:]:
        mine = answers[cfg.label]
        divergence = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                      for x, y in zip(mine, full)]
        result.append({**cfg.to_dict(), "items": items, "capped": capped[cfg.label], "full_capped": capped["full"],
                       **divergence_summary(divergence, [len(x) for x in mine], [len(y) for y in full])})
    return result


def divergence_summary(divergence: list[int], lengths: list[int], full_lengths: list[int]) -> dict[str, Any]:
    """Per problem, the first token at which an answer differs from the full cache's (the shorter
    length where one is the other's prefix) and both lengths; the quartiles count only the answers
    that differ (an identical answer never diverged)."""
    identical = [d == n == f for d, n, f in zip(divergence, lengths, full_lengths)]
    diverged = [d for d, same in zip(divergence, identical) if not same]
    lengths_a, full_a = np.asarray(lengths, dtype=np.float64), np.asarray(full_lengths, dtype=np.float64)
    return {
        "problems": len(divergence), "identical": sum(identical), "divergence": list(divergence),
        "divergence_quartiles": np.percentile(diverged, [25, 50, 75]).tolist() if diverged else [None] * 3,
        "lengths": list(lengths), "full_lengths": list(full_lengths),
        "length_mean": float(lengths_a.mean()), "full_length_mean": float(full_a.mean()),
        "length_ratio_median": float(np.median(lengths_a / np.maximum(full_a, 1))),
    }


# ---------------------------------------------------------------------------
# Advice: the smallest budget per method that meets the user's target
# ---------------------------------------------------------------------------


def advice(summary: list[dict[str, Any]], args, bytes_per_cell: float) -> list[dict[str, Any]]:
    """Per method (and sweep series), the smallest scored budget whose figures after compression meet
    the targets, with its K/V memory at each ``--context`` against the full cache's."""
    out = []
    series = dict.fromkeys(r["series"] for r in summary if r["method"] != "full")
    for name in series:
        rows = sorted((r for r in summary if r["series"] == name), key=lambda r: r["budget"])
        chosen = None
        for r in rows:
            stats = r["stats_compressed"]
            if stats is None or not r["positions_compressed"]:
                continue
            ok = stats["kld_p99"] <= args.max_p99_kld
            if args.min_same_top1 is not None:
                ok = ok and 100.0 * stats["same_top1"] >= args.min_same_top1
            if ok:
                chosen = r
                break
        entry: dict[str, Any] = {"series": name, "budget": None, "tried": [r["budget"] for r in rows]}
        if chosen is not None:
            stats = chosen["stats_compressed"]
            cells = chosen["budget"] + chosen["buffer"]
            entry.update(budget=chosen["budget"], kld_p99=stats["kld_p99"], same_top1=stats["same_top1"],
                         kld_mean=stats["kld_mean"], positions=chosen["positions_compressed"],
                         memory=[{"context": c, "kv_mib": bytes_per_cell * min(cells, c) / MIB,
                                  "full_kv_mib": bytes_per_cell * c / MIB} for c in args.context])
        out.append(entry)
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

STAT_HEADERS = ["positions", "mean KLD", "median", "p90", "p95", "p99", "p99.9", "max", "same top-1 %",
                "mean Δp %", "RMS Δp %", "ΔNLL"]


def stat_cells(positions: int, stats: Optional[dict[str, float]]) -> list[Any]:
    if not stats:
        return [positions] + [None] * (len(STAT_HEADERS) - 1)
    pct = lambda v, e: f"{100 * v:.2f} ± {100 * e:.2f}"          # noqa: E731
    return [positions, f"{stats['kld_mean']:.4g} ± {stats['kld_mean_error']:.2g}", stats["kld_median"],
            stats["kld_p90"], stats["kld_p95"], stats["kld_p99"], stats["kld_p99_9"], stats["kld_max"],
            pct(stats["same_top1"], stats["same_top1_error"]), pct(stats["dp_mean"], stats["dp_mean_error"]),
            pct(stats["dp_rms"], stats["dp_rms_error"]),
            f"{stats['nll_diff']:.4g} ± {stats['nll_diff_error']:.2g}"]


def gap_cell(row: dict[str, Any]) -> str:
    """The paired gap to the best configuration at the budget, or "best"."""
    if "kld_vs_best" not in row:
        return "–"
    if row["best"] == row["label"]:
        return "best"
    return f"{row['kld_vs_best']:+.3g} ± {row['kld_vs_best_error']:.2g}"


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    parts = []
    if result["summary"]:
        sampling = (f"sampled at temperature {s['temperature']} (top-p {s['top_p']}, seed {s['seed']})"
                    if s["temperature"] > 0 else "greedy")
        parts.append(
            f"Model `{s['model']}`, {s['n_texts']} text(s) of {s['length']} tokens from `{s['data']}` (the full-cache "
            f"model's own answers, {sampling}), {s['scored_positions']} scored positions; kv_buffer {s['kv_buffer']}, "
            f"chunk {s['chunk']}. KLD = KL(full ‖ compressed) per token in nats, its statistics as llama-perplexity "
            f"--kl-divergence prints them (± one standard error); Δp = p(next token) compressed − full; ΔNLL = "
            f"ln PPL(compressed) − ln PPL(full); 'mean KLD − best's' = the paired difference to the configuration with "
            f"the lowest mean KLD at that budget, over the same positions (its error treats positions as "
            f"independent: a lower bound).\n\n**After the first compression** (positions ≥ budget + buffer, "
            f"where the configurations differ):\n\n")
        rows = [[r["label"], *stat_cells(r["positions_compressed"], r["stats_compressed"]), gap_cell(r),
                 r["compressions"]] for r in result["summary"] if r["method"] != "full"]
        parts.append(markdown_table(["config", *STAT_HEADERS, "mean KLD − best's", "compressions"], rows))
        parts.append("\n**All scored positions:**\n\n")
        rows = [[r["label"], *stat_cells(r["positions"], r["stats"])] for r in result["summary"]]
        parts.append(markdown_table(["config", *STAT_HEADERS], rows))
    if result.get("free_running"):
        fr = result["free_running"]
        parts.append(f"\n**Free running**: {fr[0]['problems']} problems answered greedily by each configuration "
                     f"(at most {s['max_answer_tokens']} tokens); tokens until the answer first differs from the full "
                     f"cache's (quartiles over the answers that differ) and answer lengths.\n\n")
        rows = [[r["label"], f"{r['identical']}/{r['problems']}", *r["divergence_quartiles"], r["length_mean"],
                 r["full_length_mean"], r["length_ratio_median"], f"{r['capped']} ({r['full_capped']})"] for r in fr]
        parts.append(markdown_table(["config", "identical", "diverges at: q1", "median", "q3", "mean length",
                                     "full's mean length", "median length ratio", "cut at the limit (full)"], rows))
    if result.get("advice") is not None:
        parts.append("\n" + render_advice(result))
    return "".join(parts)


def render_advice(result: dict[str, Any]) -> str:
    s = result["settings"]
    target = f"99th-percentile KLD ≤ {s['max_p99_kld']}"
    if s["min_same_top1"] is not None:
        target += f" and same top-1 ≥ {s['min_same_top1']} %"
    contexts = s["context"]
    headers = ["method", "smallest budget", "p99 KLD", "same top-1 %", "mean KLD"]
    headers += [f"K/V MiB at {c:,} tokens (full)" for c in contexts]
    rows = []
    for a in result["advice"]:
        if a["budget"] is None:
            rows.append([a["series"], f"none of {','.join(map(str, a['tried']))}"] + [None] * (len(headers) - 2))
            continue
        rows.append([a["series"], a["budget"], a["kld_p99"], 100 * a["same_top1"], a["kld_mean"],
                     *(f"{m['kv_mib']:.1f} ({m['full_kv_mib']:.0f}, {100 * (1 - m['kv_mib'] / m['full_kv_mib']):.0f} % saved)"
                       for m in a["memory"])])
    return (f"**Budget advice** for `{s['model']}` ({target}, after the first compression; "
            f"{s['scored_positions']} positions scored in {s['scoring_seconds']:.0f} s). Memory: the growing "
            f"cache's K/V (budget + buffer cells); a smaller --max-p99-kld asks for more fidelity.\n\n"
            + markdown_table(headers, rows))


def sweep_configs(args) -> list[RunConfig]:
    """rkv at every budget with each λ of --lambdas and each window of --windows (the others at their defaults)."""
    extra = []
    for lam in args.lambdas or []:
        extra += build_configs(["rkv"], args.budgets, args.kv_buffer, args.kv_window, lam, include_full=False)
    for window in args.windows or []:
        extra += build_configs(["rkv"], args.budgets, args.kv_buffer, window, args.kv_lambda, include_full=False)
    return extra


def run(args: argparse.Namespace) -> int:
    args = settle_arguments(args)
    model_path = resolve(args.model)
    data: Path = args.data
    if not data.exists():
        raise SystemExit(f"error: {data} does not exist")
    configs = list({c.label: c for c in configs_from_args(args, include_full=False) + sweep_configs(args)}.values())
    if not configs:
        raise SystemExit("error: no configuration to score")
    chunk = chunk_size(args)
    for cfg in configs:
        if cfg.method != "full" and chunk > cfg.buffer:
            raise SystemExit(f"error: --chunk {chunk} exceeds --kv-buffer {cfg.buffer}")
    if chunk < 8:
        log(f"warning: scoring in chunks of {chunk} tokens (gcd of buffer and budgets) will be slow; "
            f"choose budgets that share a larger divisor with --kv-buffer, or pass --chunk")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    texts, cached = load_or_make_texts(model_path, data, args, out) if args.texts else ([], False)
    if texts:
        log(f"fidelity: {len(texts)} text(s) {'from the cache' if cached else 'generated'}: "
            + ", ".join(f"{len(t['tokens'])} tokens ({sum(t['generated'])} generated)" for t in texts))

    tallies = {cfg.label: Tally(cfg) for cfg in configs}
    total = sum(-(-(len(t["tokens"]) - 1) // chunk) for t in texts) * (len(configs) + 1)
    t0 = time.perf_counter()
    if texts:
        progress = progress_bar(total, "fidelity: scoring (chunks)")
        for text in texts:
            score_text(model_path, text, configs, tallies, chunk, args, progress)
        progress.close()
    scoring_seconds = time.perf_counter() - t0
    summary = [tallies[cfg.label].summary() for cfg in configs] if texts else []
    if texts:
        gaps = paired_gaps(tallies)
        for row in summary:
            row.update(gaps.get(row["label"], {}))
        save_positions(tallies, out / "fidelity_positions.npz")
    result: dict[str, Any] = {
        "settings": {
            "model": model_path.name, "model_path": str(model_path), "data": data.name, "n_texts": len(texts),
            "length": args.length, "max_answer_tokens": args.max_answer_tokens, "first_item": args.first_item,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
            "methods": args.methods, "budgets": args.budgets, "kv_buffer": args.kv_buffer,
            "kv_window": args.kv_window, "kv_lambda": args.kv_lambda, "lambdas": args.lambdas, "windows": args.windows,
            "chunk": chunk, "threads": args.threads,
            "n_gpu_layers": args.n_gpu_layers, "texts_cached": cached,
            "scored_positions": summary[0]["positions"] if summary else 0,
            "text_tokens": [len(t["tokens"]) for t in texts], "prompt": PROMPT_SUFFIX,
            "scoring_seconds": scoring_seconds, "max_p99_kld": args.max_p99_kld,
            "min_same_top1": args.min_same_top1, "context": args.context,
        },
        "machine": machine_info(args.threads, args.n_gpu_layers),
        "summary": summary,
    }
    if args.free_running:
        result["free_running"] = free_running(model_path, read_jsonl(data), configs, args)
    if args.advise:
        result["advice"] = advice(summary, args, max(r["bytes_per_cell"] for r in summary))
    write_results("fidelity", result, render_markdown(result), out)
    return 0
