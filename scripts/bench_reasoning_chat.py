"""A multi-turn reasoning chat with a budget: time to first token and total time per turn, and the
K/V memory, with the prompt kept whole (kv_keep_prompt), without it (the cache compressed
prompt and thinking alike, so each turn evaluates the whole conversation again), and a full cache.

    python scripts/bench_reasoning_chat.py --model smollm2-135m --budget 256 --buffer 64 --out results/reasoning-chat

The model writes reasoning-shaped turns under a grammar (thinking of --thinking-chars characters,
``</think>``, an answer of --answer-chars), through a chat template that opens the thinking in the
prompt and drops it from the history, as DeepSeek-R1's does: so every turn's prompt shares the
previous turn's prompt, not its thinking. Configurations take turns, one chat turn each, so that a
noisy machine slows them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List

from rkv_local import Llama   # first: binds llama_cpp to rkv-local's library
from rkv_local.models import resolve_model

from llama_cpp import LlamaGrammar, llama_chat_format  # noqa: E402

THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and '</think>' in m['content'] %}{{ m['content'].split('</think>')[-1] | trim }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
SYSTEM = (
    "You are a careful tutor. Before you answer, think step by step inside <think> and </think>. The student "
    "works through a problem set on rates, ratios and areas; keep your answers short and give units. "
) * 6
QUESTIONS = [
    "A train travels 240 km in 3 hours. What is its average speed?",
    "At that speed, how long does it take to travel 400 km?",
    "A rectangle is 12 m by 7 m. What is its area, and what is its perimeter?",
    "If the rectangle's sides both double, by what factor does the area grow?",
    "Mix 3 parts water with 2 parts juice: how much juice is in 5 litres of the mix?",
]


def run_turn(llm: Llama, messages: List[Dict[str, str]], grammar: str) -> Dict[str, Any]:
    start = time.perf_counter()
    first = None
    text = []
    for chunk in llm.create_chat_completion(messages, grammar=LlamaGrammar.from_string(grammar, verbose=False),
                                            max_tokens=0, temperature=0.0, stream=True):
        delta = chunk["choices"][0]["delta"].get("content")
        if delta:
            first = first if first is not None else time.perf_counter() - start
            text.append(delta)
    total = time.perf_counter() - start
    s = llm.kv_stats()
    return dict(ttft_s=first, total_s=total, text="".join(text), prompt_tokens=s.prompt_tokens,
                prompt_evaluated=s.prompt_tokens_evaluated, tokens=s.n_tokens, cells_used=s.cells_used,
                cells_peak=s.cells_peak, kv_bytes_used=s.kv_bytes_used, compressions=s.compressions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--keep", type=int, default=1024, help="kv_keep_prompt of the kept-prompt configuration")
    ap.add_argument("--thinking-chars", type=int, default=2400)
    ap.add_argument("--answer-chars", type=int, default=160)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for results.json and table.md")
    args = ap.parse_args()

    path = str(resolve_model(args.model))
    # llama.cpp refuses a repetition count above 2000: the thinking comes in lines of 100 characters
    lines, rest = divmod(args.thinking_chars, 100)
    grammar = (f'root ::= line{{{lines}}} [a-z ]{{{rest}}} "</think>" "\\n\\n" [a-z ]{{{args.answer_chars}}}\n'
               f'line ::= [a-z ]{{100}}')
    common = dict(n_threads=args.threads, n_threads_batch=args.threads, verbose=False, flash_attn=True)
    budget = dict(kv_budget=args.budget, kv_buffer=args.buffer)
    configs = {
        "kept prompt": dict(**budget, kv_keep_prompt=args.keep),
        "budget, prompt compressed": dict(**budget),
        "full cache": dict(n_ctx=8192),
    }
    llms = {}
    for name, kw in configs.items():
        llm = Llama(path, **common, **kw)
        eos, bos = llm.token_eos(), llm.token_bos()
        text = lambda t: llm._model.token_get_text(t) if t != -1 else ""  # noqa: E731
        llm.chat_handler = llama_chat_format.Jinja2ChatFormatter(
            template=THINK_TEMPLATE, eos_token=text(eos), bos_token=text(bos)).to_chat_handler()
        llms[name] = llm
    histories = {name: [{"role": "system", "content": SYSTEM}] for name in configs}
    turns: Dict[str, List[Dict[str, Any]]] = {name: [] for name in configs}
    for turn in range(args.turns):
        for name, llm in llms.items():
            history = histories[name]
            history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            result = run_turn(llm, history, grammar)
            history.append({"role": "assistant", "content": result.pop("text")})
            result["physical_cells"] = llm._ctx.n_ctx()
            turns[name].append(result)
            print(f"turn {turn + 1} {name}: ttft {result['ttft_s']:.2f} s, total {result['total_s']:.1f} s, "
                  f"prompt {result['prompt_evaluated']}/{result['prompt_tokens']} evaluated, "
                  f"cells {result['cells_used']}", flush=True)

    per_cell = {name: max(t["kv_bytes_used"] for t in ts) / max(t["cells_used"] for t in ts) for name, ts in turns.items()}
    lines = ["| config | turn | prompt tokens | evaluated | time to first token (s) | turn total (s) | tokens in the "
             "sequence | cells in use | K/V in use (MiB) | K/V allocated (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, ts in turns.items():
        for i, t in enumerate(ts):
            lines.append(f"| {name} | {i + 1} | {t['prompt_tokens']} | {t['prompt_evaluated']} | {t['ttft_s']:.2f} | "
                         f"{t['total_s']:.1f} | {t['tokens']} | {t['cells_used']} | {t['kv_bytes_used'] / 2**20:.1f} | "
                         f"{t['physical_cells'] * per_cell[name] / 2**20:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(args=vars(args), turns=turns), f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
