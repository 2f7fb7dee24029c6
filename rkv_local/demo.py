"""`make demo`: a short reasoning answer from SmolLM2-135M with a budgeted KV cache."""
from __future__ import annotations

import sys
import time

from . import Llama
from .models import fetch

QUESTION = "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples are left? Think step by step."


def main() -> int:
    model = fetch("smollm2-135m")
    llm = Llama(str(model), kv_budget=64, kv_buffer=32, kv_method="rkv", n_threads=2, seed=0, verbose=False)
    print(f"model: {model.name}\nquestion: {QUESTION}\n")
    start = time.perf_counter()
    n_chunks = 0
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": QUESTION}], max_tokens=300, temperature=0.0, stream=True
    ):
        text = chunk["choices"][0]["delta"].get("content", "")
        n_chunks += bool(text)
        print(text, end="", flush=True)
    elapsed = time.perf_counter() - start
    s = llm.kv_stats()
    print("\n\nKV cache:")
    print(f"  method {s.method}, budget {s.budget}, buffer {s.buffer}")
    print(f"  tokens {s.n_tokens}, cells in use {s.cells_used} (peak {s.cells_peak}), compressions {s.compressions}")
    print(f"  K/V bytes {s.kv_bytes_used:,} of {s.kv_bytes_full:,} for a full cache "
          f"({100 * s.kv_bytes_used / max(s.kv_bytes_full, 1):.0f}%)")
    print(f"  {n_chunks} pieces in {elapsed:.1f} s, compressing took {s.compress_seconds * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
