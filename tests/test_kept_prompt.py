"""The kept prompt (kv_keep_prompt) and paused compression (kv_compress="think") in the engine:
selection against the reference, truncations into the kept prompt, state, the cell bounds."""
from __future__ import annotations

import numpy as np
import pytest

from rkv_local import Llama, _native, reference
from engine_helpers import GGML_TYPES, greedy, memory, random_tokens
from near_tie import assert_same_greedy
from test_engine import model_shape
import llama_cpp

BUDGET, BUFFER, WINDOW, PROMPT = 40, 16, 8, 30


def make_llm(path, *, keep=64, method="rkv", type_kv="f16", **kw) -> Llama:
    return Llama(str(path), kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW, kv_method=method,
                 kv_keep_prompt=keep, type_k=GGML_TYPES[type_kv], n_threads=2, verbose=False, **kw)


def start(llm: Llama, prompt: list[int]) -> None:
    """Evaluate a prompt the way generate() does: its tokens marked as the kept prompt first."""
    _native.set_kept_prompt(llm._ctx.ctx, 0, min(len(prompt), llm.kv_keep_prompt))
    llm.eval(prompt)


def compress_against_reference(llm: Llama, method: str, n_kept: int) -> None:
    n_layer, n_head, n_head_kv, d = model_shape(llm)
    ctx = llm._ctx.ctx
    params = reference.ScoringParams(budget=BUDGET, window=WINDOW)
    before = []
    for layer in range(n_layer):
        q, k, scale = _native.layer_inputs(ctx, layer, WINDOW, n_head * d, n_head_kv * d)
        positions = [_native.kept_positions(ctx, layer, h) for h in range(n_head_kv)]
        before.append((q.reshape(WINDOW, n_head, d), k.reshape(-1, n_head_kv, d), scale, positions))
    assert _native.compress(ctx)
    for layer, (q, k, scale, positions) in enumerate(before):
        native = []
        for h in range(n_head_kv):
            after = _native.kept_positions(ctx, layer, h)
            assert len(after) == n_kept + BUDGET
            np.testing.assert_array_equal(after[:n_kept], np.arange(n_kept))   # the prompt, whole
            idx = np.searchsorted(positions[h], after)
            np.testing.assert_array_equal(positions[h][idx], after)
            native.append(idx[n_kept:] - n_kept)
        # the spec: what follows the prompt is selected as if it were the whole sequence
        expected = reference.select(method, q, k, scale, params, n_kept=n_kept)
        assert all(np.array_equal(e[:n_kept], np.arange(n_kept)) for e in expected)
        assert reference.kept_sets_equivalent(method, q, k[n_kept:], scale, params, native), f"layer {layer}"


@pytest.mark.parametrize("arch,n_head,n_head_kv,type_kv,method", [
    ("llama", 4, 2, "f16", "rkv"),
    ("qwen3", 8, 2, "q8_0", "snapkv"),
    ("qwen2", 4, 4, "f16", "streamingllm"),
    ("llama", 8, 2, "q8_0", "keydiff"),
])
def test_selection_after_a_kept_prompt_equals_reference(tiny_model, arch, n_head, n_head_kv, type_kv, method):
    llm = make_llm(tiny_model(arch=arch, n_head=n_head, n_head_kv=n_head_kv), method=method, type_kv=type_kv)
    start(llm, random_tokens(PROMPT, seed=1))
    greedy(llm, BUDGET + BUFFER - 4)
    compress_against_reference(llm, method, PROMPT)
    for _ in range(2):   # later rounds score a cache that already holds per-head tokens
        greedy(llm, BUFFER)
        assert llm.kv_stats().cells_used == PROMPT + BUDGET + BUFFER
        compress_against_reference(llm, method, PROMPT)


def test_the_kept_prompt_bounds_cells_by_prompt_plus_budget_plus_buffer(tiny_model):
    llm = make_llm(tiny_model(arch="llama"))
    start(llm, random_tokens(PROMPT, seed=2))
    assert llm.kv_stats().cells_kept == PROMPT
    peak = 0
    for _ in range(6 * (BUDGET + BUFFER)):
        greedy(llm, 1)
        peak = max(peak, llm.kv_stats().cells_used)
    stats = llm.kv_stats()
    assert stats.compressions >= 5
    assert peak == stats.cells_peak == PROMPT + BUDGET + BUFFER
    assert stats.cells_max == 64 + BUDGET + BUFFER
    assert stats.cells_kept == PROMPT
    for layer in range(2):
        np.testing.assert_array_equal(llm.kept_positions(layer, 1)[:PROMPT], np.arange(PROMPT))


def test_a_truncation_into_the_kept_prompt_uncompresses_and_equals_a_fresh_run(tiny_model):
    path = tiny_model(arch="qwen3", n_head=4, n_head_kv=2)
    prompt = random_tokens(PROMPT, seed=3)
    llm = make_llm(path)
    start(llm, prompt)
    greedy(llm, 3 * (BUDGET + BUFFER))
    stats = llm.kv_stats()
    assert stats.compressions >= 2
    mem = memory(llm)
    scored = stats.pos_compacted + WINDOW   # the newest position the last compression saw
    # into the compressed part, past the prompt: refused as before
    for p0 in (PROMPT + 1, stats.pos_compacted, scored):
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, p0, -1), p0
    # a middle part, even inside the prompt, is refused: what follows it was compressed
    assert not llama_cpp.llama_memory_seq_rm(mem, 0, 5, 10)
    # to the end of the prompt, and into it: allowed, every generated cell goes
    for p0 in (PROMPT, PROMPT - 7):
        assert llama_cpp.llama_memory_seq_rm(mem, 0, p0, -1), p0
        after = llm.kv_stats()
        assert (after.cells_used, after.pos_compacted, after.n_tokens) == (p0, -1, p0)
        assert after.compressions == stats.compressions   # the sequence's figures go on
    # what the cache holds now is the prompt's prefix as a fresh run evaluates it
    llm.n_tokens = PROMPT - 7
    turn2 = random_tokens(12, seed=4)
    _native.set_kept_prompt(llm._ctx.ctx, 0, PROMPT - 7 + len(turn2))
    llm.eval(turn2)
    ours = greedy(llm, 2 * (BUDGET + BUFFER))

    fresh = make_llm(path)
    start(fresh, prompt[:PROMPT - 7] + turn2)
    gaps: list[float] = []
    # the fresh run evaluates the prompt in one batch, ours in two: a near tie may go the other way
    assert_same_greedy(greedy(fresh, 2 * (BUDGET + BUFFER), gaps), gaps, ours)
    assert llm.kv_stats().cells_kept == fresh.kv_stats().cells_kept == PROMPT - 7 + len(turn2)


def test_a_prompt_beyond_the_first_compression_is_not_kept(tiny_model):
    """Tokens marked as prompt after a compression (a continuation) are candidates: the kept part is
    what the cache held uncompressed."""
    llm = make_llm(tiny_model(arch="llama"))
    start(llm, random_tokens(PROMPT, seed=5))
    greedy(llm, BUDGET + BUFFER + 1)
    assert llm.kv_stats().compressions == 1
    _native.set_kept_prompt(llm._ctx.ctx, 0, llm.n_tokens + 10)
    greedy(llm, 2 * BUFFER)
    stats = llm.kv_stats()
    assert stats.cells_kept == PROMPT and stats.cells_used <= PROMPT + BUDGET + BUFFER


def test_state_round_trip_keeps_the_prompt_and_the_pause(tiny_model):
    path = tiny_model(arch="llama", n_head=4, n_head_kv=2)
    llm = make_llm(path)
    start(llm, random_tokens(PROMPT, seed=6))
    head = greedy(llm, 2 * (BUDGET + BUFFER))
    _native.set_paused(llm._ctx.ctx, 0, True)
    state = llm.save_state()
    gaps: list[float] = []
    expected = greedy(llm, 40, gaps)

    other = make_llm(path)
    other.load_state(state)
    stats = other.kv_stats()
    assert (stats.cells_kept, stats.compression_paused) == (PROMPT, True)
    other.n_tokens -= 1
    other.eval([head[-1]])
    assert_same_greedy(expected, gaps, greedy(other, 40))   # a restored state: tests/near_tie.py
    assert other.kv_stats().compressions == stats.compressions   # still paused: no compression


def test_paused_compression_grows_while_the_cache_has_room(tiny_model):
    llm = make_llm(tiny_model(arch="llama"), keep=0)
    physical = llm._ctx.n_ctx()
    assert physical == 256
    llm.eval(random_tokens(BUDGET + BUFFER, seed=7))
    _native.set_paused(llm._ctx.ctx, 0, True)
    greedy(llm, physical - (BUDGET + BUFFER))
    stats = llm.kv_stats()
    assert (stats.compressions, stats.cells_used) == (0, physical)
    greedy(llm, 1)   # no cell left: compressed as usual rather than failing
    stats = llm.kv_stats()
    assert stats.compressions == 1 and stats.cells_used == BUDGET + 1
    _native.set_paused(llm._ctx.ctx, 0, False)
    greedy(llm, BUFFER)
    assert llm.kv_stats().compressions == 2
