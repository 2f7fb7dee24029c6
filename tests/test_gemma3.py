"""A real interleaved sliding-window model: Google's Gemma 3 270M (window 512 on five of every six
layers), with budgets whose context is smaller than its window (issue 33).

llama.cpp caps a window cache at n_ctx, and a budgeted context's n_ctx is budget + buffer: before
the window cache was sized for the window itself, kv_budget 128 failed after about 240 tokens.
Here: the tiny models' window cache holds a window wider than the budgeted context, the real model
writes 2,000 tokens past kv_budget 64 and 128 (the text equal to the full cache's until the first
compression) through ``Llama``, ``BatchedLlama`` with three sequences, a state saved and restored,
and the server; a model without a chat template says so once.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from rkv_local import BatchedLlama, Llama, _native
from rkv_local.evals.decoding import eog_tokens
from rkv_local.llama import padded_cells
from rkv_local.models import fetch

from engine_helpers import greedy, last_logits
from near_tie import assert_same_greedy

PROMPT = "The history of the Roman Empire begins"
LENGTH = 2000      # tokens generated past the budget
BUFFER = 32


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    if os.environ.get("RKV_TEST_VOCAB"):
        pytest.skip("Gemma 3's weights are not here (RKV_TEST_VOCAB: offline, SmolLM2's tokenizer only)")
    return fetch("gemma3-270m")


def window_cells_needed(llm: Llama) -> int:
    window = _native.window_cache(llm._ctx.ctx)
    return padded_cells(window.n_swa + llm.context_params.n_ubatch)


# --- the window cache of a budgeted context -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gemma3", "gpt-oss"])
def test_a_window_wider_than_the_budgeted_context_fits(tiny_model, arch):
    """Budget 64 + buffer 32 is a 256-cell context; the window is 300 tokens: llama.cpp alone would give the
    window cache 256 cells and fail once they are full."""
    path = tiny_model(arch=arch, n_layer=6 if arch == "gemma3" else 4, n_head=4, n_head_kv=2, head_dim=32,
                      sliding_window=300)
    llm = Llama(str(path), kv_budget=64, kv_buffer=BUFFER, n_threads=2, verbose=False)
    try:
        window = _native.window_cache(llm._ctx.ctx)
        assert window.n_swa == 300 and llm._ctx.n_ctx() == 256
        assert window.cells == padded_cells(300 + BUFFER) == 512
        llm.eval([llm.token_bos()])
        greedy(llm, 450)
        stats = llm.kv_stats()
        assert stats.n_tokens == 451 and stats.cells_used <= 64 + BUFFER and stats.compressions >= 10
        # the window layers hold the window, no more; their bytes are counted apart from the budget's
        now = _native.window_cache(llm._ctx.ctx)
        assert 300 <= now.cells_used <= now.cells
        assert stats.kv_bytes_window == now.cells_used * now.bytes_per_cell > 0
        assert stats.kv_bytes_window_allocated == now.cells * now.bytes_per_cell
    finally:
        llm.close()


def test_without_a_budget_the_window_cache_is_llama_cpps(tiny_model):
    """The sizing is only changed for budgeted contexts: a full cache of 256 cells keeps llama.cpp's."""
    path = tiny_model(arch="gemma3", n_layer=6, n_head=4, n_head_kv=2, head_dim=32, sliding_window=300)
    llm = Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
    try:
        assert _native.window_cache(llm._ctx.ctx).cells == 256
        llm.eval([llm.token_bos()] + [1000] * 9)
        stats = llm.kv_stats()
        assert stats.kv_bytes_window == 10 * _native.window_cache(llm._ctx.ctx).bytes_per_cell
    finally:
        llm.close()


# --- the real model --------------------------------------------------------------------------------------


def greedy_recording_compressions(llm: Llama, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens; for each, how many compressions had run when its logits were computed."""
    llm.eval(prompt)
    tokens, compressions = [], []
    for _ in range(n):
        compressions.append(llm.kv_stats().compressions)
        tokens.append(int(np.argmax(last_logits(llm))))
        llm.eval([tokens[-1]])
    return tokens, compressions


@pytest.fixture(scope="module")
def full_cache_tokens(gemma3_path) -> tuple[list[int], list[float]]:
    """200 greedy tokens of a full cache, and the gap between the two best logits of each."""
    llm = Llama(str(gemma3_path), n_ctx=1024, n_threads=2, verbose=False)
    try:
        llm.eval(llm.tokenize(PROMPT.encode()))
        gaps: list[float] = []
        return greedy(llm, 200, gaps), gaps
    finally:
        llm.close()


@pytest.mark.parametrize("budget", [64, 128])
def test_real_gemma3_writes_2000_tokens_past_a_small_budget(gemma3_path, full_cache_tokens, budget):
    llm = Llama(str(gemma3_path), kv_budget=budget, kv_buffer=BUFFER, n_threads=2, verbose=False)
    try:
        assert _native.window_cache(llm._ctx.ctx).cells == window_cells_needed(llm) == 768
        prompt = llm.tokenize(PROMPT.encode())
        tokens, compressions = greedy_recording_compressions(llm, prompt, LENGTH)
        stats = llm.kv_stats()
        assert stats.n_tokens == len(prompt) + LENGTH
        assert stats.cells_peak <= budget + BUFFER and stats.compressions >= (LENGTH - budget) // BUFFER
        # until the first compression the budgeted cache holds what the full one holds: the same tokens (up
        # to a near tie: the full cache's window cache has other cells, so n_kv and rounding may differ)
        before = compressions.index(1)
        assert before == budget + BUFFER - len(prompt) + 1
        full_tokens, gaps = full_cache_tokens
        assert_same_greedy(full_tokens[:before], gaps, tokens[:before], f"budget {budget}")
    finally:
        llm.close()


def test_real_gemma3_completion_and_state(gemma3_path):
    """create_completion streams 2,000 tokens at budget 64 (end tokens banned); a state saved mid-way and
    restored continues as the saved Llama did."""
    llm = Llama(str(gemma3_path), kv_budget=64, kv_buffer=BUFFER, n_threads=2, verbose=False)
    try:
        ban = {int(t): -1e9 for t in eog_tokens(llm)}
        chunks = list(llm.create_completion(PROMPT, max_tokens=LENGTH, temperature=0.0, logit_bias=ban, stream=True))
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "".join(c["choices"][0]["text"] for c in chunks)
        stats = llm.kv_stats()   # the last token is sampled, not evaluated
        assert stats.n_tokens == stats.prompt_tokens + LENGTH - 1 and stats.cells_peak <= 64 + BUFFER
        state = llm.save_state()
        # llama.cpp's state keeps no logits (after load_state the context holds the last decode's): the
        # next token is taken before, and each run goes on from evaluating it
        nxt = int(np.argmax(last_logits(llm)))
        llm.eval([nxt])
        after_save = greedy(llm, 100)
        llm.load_state(state)
        llm.eval([nxt])
        assert greedy(llm, 100) == after_save   # the same path twice: exactly equal
    finally:
        llm.close()


def test_real_gemma3_batched_three_sequences(gemma3_path):
    """Three requests decoded together, 2,000 tokens each, every stream within its budget throughout."""
    prompts = [PROMPT, "Photosynthesis is the process", "In 1969 the first"]
    with BatchedLlama(str(gemma3_path), n_seq_max=3, kv_budget=64, kv_buffer=BUFFER, n_threads=2) as batch:
        ban = {int(t): -1e9 for t in eog_tokens(batch._proto)}
        texts, ends, peaks = ["", "", ""], [None] * 3, [0, 0, 0]
        for n, (index, chunk) in enumerate(batch.stream_batch(prompts, max_tokens=LENGTH, temperature=0.0,
                                                               logit_bias=ban)):
            choice = chunk["choices"][0]
            texts[index] += choice["text"]
            ends[index] = choice["finish_reason"] or ends[index]
            if n % 200 == 0:
                peaks = [max(p, batch.kv_stats(s).cells_used) for s, p in enumerate(peaks)]
        assert ends == ["length"] * 3 and all(texts)
        assert 0 < max(peaks) <= 64 + BUFFER
        assert batch.step_stats().tokens >= 3 * LENGTH


def test_real_gemma3_through_the_server(gemma3_path, tmp_path):
    from test_server import _metrics, serve

    vocab = Llama(str(gemma3_path), vocab_only=True, verbose=False)
    ban = {str(t): -100 for t in eog_tokens(vocab)}
    vocab.close()
    with serve(gemma3_path, tmp_path, "--kv-budget", "128", "--kv-buffer", str(BUFFER), "--parallel", "2") as server:
        chunks = server.client().completions.create(model="gemma3", prompt=PROMPT, max_tokens=LENGTH,
                                                    temperature=0.0, logit_bias=ban, stream=True)
        finish = None
        for n, chunk in enumerate(chunks):
            finish = chunk.choices[0].finish_reason or finish
            if n == LENGTH // 2:   # mid-way: the stream's both caches in the server's metrics
                metrics = _metrics(server)
                assert 0 < metrics["rkv_sequence_cells", (("seq_id", "0"),)] <= 128 + BUFFER
                assert metrics["rkv_sequence_window_kv_bytes", (("seq_id", "0"),)] > 0
        assert finish == "length"
        last = server.get("/rkv/stats")["last_finished"]
        assert last["n_tokens"] >= LENGTH and 0 < last["cells_peak"] <= 128 + BUFFER
        # the base model has no chat template: said once, at start
        log = server.log.read_text()
        assert log.count("has no chat template") == 1 and "'llama-2'" in log


# --- a model without a chat template ---------------------------------------------------------------------


def test_a_chat_without_a_template_warns_once(gemma3_path):
    llm = Llama(str(gemma3_path), n_ctx=256, n_threads=2, verbose=False)
    try:
        with pytest.warns(UserWarning, match="has no chat template.*'llama-2'") as caught:
            for _ in range(2):
                llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
        assert len([w for w in caught if "chat template" in str(w.message)]) == 1
    finally:
        llm.close()
    chosen = Llama(str(gemma3_path), n_ctx=256, n_threads=2, verbose=False, chat_format="gemma")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            chosen.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
    finally:
        chosen.close()


def test_chat_on_the_command_line_warns_once(gemma3_path):
    from test_cli import run_cli

    done = run_cli("chat", gemma3_path, "--kv-budget", "64", "--kv-buffer", str(BUFFER), "--max-tokens", "8",
                   input="Hi\nAnd you?\n")
    assert done.returncode == 0, done.stderr
    warning = f"rkv-local: warning: {gemma3_path.name} has no chat template: chat messages are formatted as 'llama-2'"
    assert done.stderr.count(warning) == 1 and "UserWarning" not in done.stderr
    chosen = run_cli("chat", gemma3_path, "--chat-format", "gemma", "--max-tokens", "8", input="Hi\n")
    assert chosen.returncode == 0 and "warning" not in chosen.stderr, chosen.stderr
    unknown = run_cli("chat", gemma3_path, "--chat-format", "no-such-format", input="Hi\n")
    assert unknown.returncode == 2 and "no-such-format" in unknown.stderr


def test_generate_counts_the_window_layers_in_its_summary(gemma3_path):
    from test_cli import run_cli

    done = run_cli("generate", gemma3_path, "The capital of France is", "--kv-budget", "64", "--kv-buffer",
                   str(BUFFER), "--max-tokens", "120", "--ignore-eos")
    assert done.returncode == 0, done.stderr
    assert "compressions 1" in done.stderr or "compressions 2" in done.stderr
    assert "for a full cache (" in done.stderr and " in the window layers, finish length" in done.stderr


def test_bench_and_fidelity_count_both_caches(gemma3_path, tmp_path):
    """bench's K/V figures are the full-attention cache's plus the window cache's; fidelity runs on a base
    model's plain-text prompts."""
    import json

    from rkv_local.evals import bench, fidelity
    from test_evals import invoke

    common = [str(gemma3_path), "--threads", "2", "--budgets", "64", "--kv-buffer", str(BUFFER)]
    out = tmp_path / "bench"
    assert invoke(bench, [*common, "--methods", "rkv", "--lengths", "160", "--prompt-tokens", "40", "--loops", "eval",
                          "--out", str(out)]) == 0
    runs = {r["label"]: r for r in json.loads((out / "bench.json").read_text())["runs"] if r.get("kind") != "limit"}
    rkv, full = runs["rkv@64"], runs["full"]
    assert rkv["compressions"] > 0 and rkv["cells_peak"] <= 64 + BUFFER
    assert rkv["kv_bytes_window"] > 0 and rkv["kv_bytes_used"] > rkv["kv_bytes_window"]
    assert rkv["kv_bytes_allocated"] > rkv["kv_bytes_window_allocated"] >= rkv["kv_bytes_window"]
    assert full["kv_bytes_used"] == full["kv_bytes_full"] > rkv["kv_bytes_used"]

    out = tmp_path / "fidelity"
    assert invoke(fidelity, [*common, "--methods", "rkv", "--texts", "1", "--length", "256", "--out", str(out)]) == 0
    row = json.loads((out / "fidelity.json").read_text())["summary"][0]
    assert row["label"] == "rkv@64" and row["compressions"] > 0 and 0.5 < row["top1"] <= 1.0
