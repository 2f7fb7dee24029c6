"""The completion loop against the raw eval loop, side by side at the same moment: a check of
`rkv-local bench --loops` figures on a machine whose speed drifts between long runs.

    python scripts/compare_loops.py qwen2.5-coder-0.5b --tokens 200 --repeats 2

Each repetition times, one after the other on one model: `create_completion(stream=True)` greedy
without and with `logit_bias` on the end tokens (what `bench` uses to mask them), then the raw loop
(argmax with the end tokens banned, `eval` of one token), each for `--tokens` tokens from the same
prompt.
"""
from __future__ import annotations

import argparse
import time

from rkv_local import Llama
from rkv_local.evals.decoding import eog_tokens, greedy_token
from rkv_local.models import resolve_model

PROMPT = "Write a very long story about a lighthouse keeper and his cat."


def completion_speed(llm: Llama, tokens: int, **kwargs: object) -> float:
    llm.reset()
    first, chunks = None, 0
    for _ in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True, **kwargs):
        chunks += 1
        first = first or time.perf_counter()   # from the first chunk: prefill left out
    return (chunks - 1) / (time.perf_counter() - first)


def eval_speed(llm: Llama, tokens: int) -> float:
    eog = eog_tokens(llm)
    llm.reset()
    llm.eval(llm.tokenize(PROMPT.encode()))
    start = time.perf_counter()
    for _ in range(tokens):
        llm.eval([greedy_token(llm, eog)])
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model name (rkv-local's list) or a GGUF path")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv-budget", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    llm = Llama(str(resolve_model(args.model)), kv_budget=args.kv_budget, n_threads=args.threads, verbose=False)
    bias = {int(t): -1e9 for t in eog_tokens(llm)}
    print("| repetition | completion tok/s | completion + logit_bias tok/s | eval loop tok/s |")
    print("|---|---|---|---|")
    for repetition in range(1, args.repeats + 1):
        plain = completion_speed(llm, args.tokens)
        biased = completion_speed(llm, args.tokens, logit_bias=bias)
        raw = eval_speed(llm, args.tokens)
        print(f"| {repetition} | {plain:.2f} | {biased:.2f} | {raw:.2f} |")
    llm.close()


if __name__ == "__main__":
    main()
