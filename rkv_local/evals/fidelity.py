"""Teacher-forced fidelity of compressed KV caches against the full cache.

Texts. The full-cache model answers reasoning problems from `--data` (default: the shipped
MATH-500) in one chat, greedily, with the model's chat template and the paper's prompt;
problems are asked one after another until the conversation reaches `--length` tokens (an
answer is cut at `--max-answer-tokens`). The texts are cached in `--out` (`fidelity_texts.json`)
and reused while the model, data and settings match (`--regenerate` makes them anew).

Scoring. Every configuration reads the same token sequence in chunks (`--chunk`; by default the
greatest common divisor of `--kv-buffer` and the budgets, so that every cache is compressed
exactly when it holds budget + buffer cells, as in token-by-token decoding), in lockstep with a
full-cache reference. At each position whose next token the model wrote, it compares the
next-token distributions: top-1 agreement with the full cache, KL(full ‖ compressed) and the
difference of the negative log-likelihood of the actual next token (compressed − full). The
`*_compressed` figures count only the positions after the cache's first compression
(position ≥ budget + buffer), where the configurations differ at all.

Outputs in `--out`: `fidelity.json`, `fidelity.md`, `fidelity.png`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from tqdm import tqdm

from ..llama import padded_cells
from .datasets import data_path, read_jsonl
from .decoding import ChatTemplate, clear_cache, eog_tokens, eval_all_logits, greedy_token
from .measure import machine_info
from .report import file_digest, log, markdown_table, progress_bar, write_json, write_results
from .runs import RunConfig, add_kv_arguments, add_model_arguments, configs_from_args, open_llama, resolve
from .tasks import PROMPT_SUFFIX, item_question

HELP = "teacher-forced top-1 agreement, KL and NLL of compressed caches vs the full cache"
EXAMPLE = "example:\n  rkv-local eval fidelity qwen2.5-coder-0.5b --budgets 64,256,1024"

BIN = 256  # positions per bin of the per-position curves in fidelity.json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_kv_arguments(parser, methods="full,rkv,snapkv,h2o,streamingllm,keydiff,triattention", budgets="64,128,256,512,1024")
    parser.add_argument("--data", type=data_path, metavar="NAME|FILE", default=data_path("math500"),
                        help="a shipped benchmark (gsm8k, math500, aime24) or a JSONL file of problems "
                             "(question or problem field; default: math500)")
    parser.add_argument("--texts", type=int, metavar="N", default=2, help="number of texts (default: %(default)s)")
    parser.add_argument("--length", type=int, metavar="N", default=3072, help="tokens per text (default: %(default)s)")
    parser.add_argument("--max-answer-tokens", type=int, metavar="N", default=2048,
                        help="cut one answer after this many tokens (default: %(default)s)")
    parser.add_argument("--first-item", type=int, metavar="N", default=0,
                        help="index of the first problem in --data (default: %(default)s)")
    parser.add_argument("--chunk", type=int, metavar="N", default=0,
                        help="tokens per decode call while scoring (default: gcd of --kv-buffer and the budgets)")
    parser.add_argument("--regenerate", action="store_true", help="generate the texts again even if cached")
    parser.add_argument("--out", type=Path, metavar="DIR", default=Path("fidelity-out"), help="output folder (default: %(default)s)")


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
                     threads=args.threads, n_gpu_layers=args.n_gpu_layers)
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
                    tok = greedy_token(llm)
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


def texts_key(model_path: Path, data: Path, args) -> dict[str, Any]:
    return {
        "model": model_path.name, "model_digest": file_digest(model_path), "data": data.name,
        "data_digest": hashlib.sha256(data.read_bytes()).hexdigest()[:16], "texts": args.texts,
        "length": args.length, "max_answer_tokens": args.max_answer_tokens, "first_item": args.first_item,
        "prompt": PROMPT_SUFFIX,
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


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32, copy=True)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x


class Tally:
    """Per-position figures of one configuration, over all texts."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.position: list[np.ndarray] = []
        self.agree: list[np.ndarray] = []
        self.kl: list[np.ndarray] = []
        self.nll: list[np.ndarray] = []
        self.nll_full: list[np.ndarray] = []
        self.compressions = 0
        self.seconds = 0.0

    def add(self, positions, agree, kl, nll, nll_full) -> None:
        self.position.append(positions)
        self.agree.append(agree)
        self.kl.append(kl)
        self.nll.append(nll)
        self.nll_full.append(nll_full)

    def summary(self) -> dict[str, Any]:
        cfg = self.config
        pos = np.concatenate(self.position) if self.position else np.zeros(0, dtype=np.int64)
        agree = np.concatenate(self.agree) if self.agree else np.zeros(0)
        kl = np.concatenate(self.kl) if self.kl else np.zeros(0)
        diff = (np.concatenate(self.nll) - np.concatenate(self.nll_full)) if self.nll else np.zeros(0)
        start = cfg.budget + cfg.buffer if cfg.method != "full" else None
        after = pos >= start if start is not None else np.zeros(len(pos), dtype=bool)

        def mean(a):
            return float(np.mean(a)) if len(a) else None

        bins = []
        if len(pos):
            for b0 in range(0, int(pos.max()) + 1, BIN):
                sel = (pos >= b0) & (pos < b0 + BIN)
                if sel.any():
                    bins.append({"start": b0, "positions": int(sel.sum()), "top1": mean(agree[sel]),
                                 "kl": mean(kl[sel]), "nll_diff": mean(diff[sel])})
        return {
            **cfg.to_dict(),
            "positions": int(len(pos)),
            "top1": mean(agree), "kl": mean(kl), "nll_diff": mean(diff),
            "positions_compressed": int(after.sum()),
            "top1_compressed": mean(agree[after]), "kl_compressed": mean(kl[after]),
            "nll_diff_compressed": mean(diff[after]),
            "nll_full": mean(np.concatenate(self.nll_full)) if self.nll_full else None,
            "compressions": self.compressions,
            "seconds": self.seconds,
            "bins": bins,
        }


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
            mask = generated[s + 1:e + 1]
            rows = np.flatnonzero(mask)
            targets = np.asarray(tokens[s + 1:e + 1])[rows]
            logits = eval_all_logits(ref, piece)
            if len(rows):
                ref_logits = logits[rows]
                lp_ref = log_softmax(ref_logits)
                top_ref = ref_logits.argmax(axis=1)
                p_ref = np.exp(lp_ref)
                nll_ref = -lp_ref[np.arange(len(rows)), targets].astype(np.float64)
            progress.update(1)
            for cfg, llm in instances:
                t0 = time.perf_counter()
                logits = eval_all_logits(llm, piece)
                tally = tallies[cfg.label]
                if len(rows):
                    c_logits = logits[rows]
                    lp = log_softmax(c_logits)
                    agree = (c_logits.argmax(axis=1) == top_ref)
                    kl = np.sum(p_ref * (lp_ref - lp), axis=1, dtype=np.float64)
                    nll = -lp[np.arange(len(rows)), targets].astype(np.float64)
                    tally.add(s + rows, agree, kl, nll, nll_ref)
                tally.seconds += time.perf_counter() - t0
                progress.update(1)
        for cfg, llm in instances:
            tallies[cfg.label].compressions += llm.kv_stats().compressions
    finally:
        for _, llm in instances:
            llm.close()
        ref.close()


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    headers = ["config", "positions", "top-1 agreement", "mean KL", "ΔNLL", "compressed positions",
               "top-1 (compressed)", "KL (compressed)", "ΔNLL (compressed)", "compressions"]
    rows = [[r["label"], r["positions"], r["top1"], r["kl"], r["nll_diff"], r["positions_compressed"],
             r["top1_compressed"], r["kl_compressed"], r["nll_diff_compressed"], r["compressions"]]
            for r in result["summary"]]
    head = (f"Model `{s['model']}`, {s['n_texts']} text(s) of {s['length']} tokens from `{s['data']}` "
            f"(the full-cache model's own greedy answers), {s['scored_positions']} scored positions; "
            f"kv_buffer {s['kv_buffer']}, chunk {s['chunk']}. KL = KL(full ‖ compressed) in nats per token; "
            f"ΔNLL = NLL(compressed) − NLL(full) of the actual next token (full-cache NLL "
            f"{result['summary'][0]['nll_full'] if result['summary'] else float('nan'):.3f}). "
            f"'compressed' columns: positions ≥ budget + buffer only.\n\n")
    return head + markdown_table(headers, rows)


def run(args: argparse.Namespace) -> int:
    model_path = resolve(args.model)
    data: Path = args.data
    if not data.exists():
        raise SystemExit(f"error: {data} does not exist")
    configs = configs_from_args(args, include_full=False)
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

    texts, cached = load_or_make_texts(model_path, data, args, out)
    log(f"fidelity: {len(texts)} text(s) {'from the cache' if cached else 'generated'}: "
        + ", ".join(f"{len(t['tokens'])} tokens ({sum(t['generated'])} generated)" for t in texts))

    tallies = {cfg.label: Tally(cfg) for cfg in configs}
    total = sum(-(-(len(t["tokens"]) - 1) // chunk) for t in texts) * (len(configs) + 1)
    progress = progress_bar(total, "fidelity: scoring (chunks)")
    t0 = time.perf_counter()
    for text in texts:
        score_text(model_path, text, configs, tallies, chunk, args, progress)
    progress.close()
    summary = [tallies[cfg.label].summary() for cfg in configs]
    scored = summary[0]["positions"] if summary else 0
    result = {
        "settings": {
            "model": model_path.name, "model_path": str(model_path), "data": data.name, "n_texts": len(texts),
            "length": args.length, "max_answer_tokens": args.max_answer_tokens, "first_item": args.first_item,
            "methods": args.methods, "budgets": args.budgets, "kv_buffer": args.kv_buffer,
            "kv_window": args.kv_window, "kv_lambda": args.kv_lambda, "chunk": chunk, "threads": args.threads,
            "n_gpu_layers": args.n_gpu_layers, "texts_cached": cached, "scored_positions": scored,
            "text_tokens": [len(t["tokens"]) for t in texts], "prompt": PROMPT_SUFFIX,
            "scoring_seconds": time.perf_counter() - t0,
        },
        "machine": machine_info(args.threads, args.n_gpu_layers),
        "summary": summary,
    }
    write_results("fidelity", result, render_markdown(result), out)
    return 0
