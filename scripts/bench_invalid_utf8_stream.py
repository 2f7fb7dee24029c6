"""A stream whose bytes stop being valid UTF-8: chunks per second per quarter, ours against
llama-cpp-python's detokenization, in one run.

    python scripts/bench_invalid_utf8_stream.py --tokens 8000 --stock-tokens 3000

A tiny random-weight model with SmolLM2's vocabulary (``rkv_local.testing.make_tiny_model``) samples
at temperature 1 with its end tokens masked: within a few dozen tokens it writes a character cut
short, after which the completion never decodes as UTF-8 again. llama-cpp-python's stream then holds
back every later token, retrying each held-back run at each token; ours goes on (invalid bytes
dropped, ``rkv_local.detokenize.CompletionBytes``). The model decodes at several hundred tokens per
second on a CPU, so the text loop's cost shows. ``--stock-tokens`` limits llama-cpp-python's run
(its cost per token grows with the tokens held back).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np

from rkv_local import Llama
from rkv_local.evals.decoding import eog_tokens
from rkv_local.models import fetch
from rkv_local.testing import make_tiny_model


def stream(llm: Llama, tokens: int, seed: int) -> List[float]:
    """Arrival time of each chunk, from the call."""
    bias = {int(t): -1e9 for t in eog_tokens(llm)}
    start = time.perf_counter()
    stamps = [time.perf_counter() - start
              for _ in llm.create_completion("Once upon a time", max_tokens=tokens, temperature=1.0, seed=seed,
                                             logit_bias=bias, stream=True)]
    return stamps


def report(name: str, llm: Llama, stamps: List[float]) -> None:
    raw = bytes(llm.detokenize(llm.input_ids[:llm.n_tokens].tolist()))
    dropped = len(raw) - len(raw.decode("utf-8", errors="ignore").encode())
    quarter = len(stamps) // 4
    bounds = [0.0] + [stamps[(i + 1) * quarter - 1] for i in range(4)]
    speeds = " / ".join(f"{quarter / (b - a):.0f}" for a, b in zip(bounds, bounds[1:]))
    gap = float(np.max(np.diff([0.0] + stamps)))
    print(f"| {name} | {llm.n_tokens} | {len(stamps)} | {dropped} | {speeds} | {gap:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8000, help="tokens our loop streams")
    parser.add_argument("--stock-tokens", type=int, default=0,
                        help="tokens llama-cpp-python's detokenization streams (0: not run)")
    parser.add_argument("--kv-budget", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny.gguf"
        make_tiny_model(path, arch="llama", vocab_from=fetch("smollm2-135m"), n_ctx_train=32768)
        print("| loop | tokens | chunks | invalid bytes | chunks/s per quarter | longest gap (s) |")
        print("|---|---|---|---|---|---|")
        for name, tokens in (("rkv_local", args.tokens), ("llama-cpp-python's detokenization", args.stock_tokens)):
            if not tokens:
                continue
            llm = Llama(str(path), n_ctx=tokens + 64, kv_budget=args.kv_budget, n_threads=args.threads,
                        verbose=False)
            if name != "rkv_local":
                llm._detokenizer = None   # Llama.detokenize then asks llama-cpp-python's tokenizer
            try:
                report(name, llm, stream(llm, tokens, args.seed))
            finally:
                llm.close()


if __name__ == "__main__":
    main()
