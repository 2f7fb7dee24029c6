"""A compression that fails leaves a sequence its owner can trust: the cache as it was, or cleared.

The engine's test hook ``RKV_TEST_FAIL`` makes a real graph of a compression fail: ``scoring`` the
first importance graph (nothing has changed yet), ``compaction:L`` the compaction graph of KV-cache
layer L, each layer then in its own graph, so with L > 0 the layers below have moved their K/V and
the cells' metadata no longer describes them. The first kind must leave the cache exactly as it was
(the same tokens kept, the same logits after it); the second must clear the sequence from every
cache of the memory and refuse its decodes until it is cleared again, never decode against a mix.
Both are reported: ``rkv_compress`` says -1 with the reason, a ``llama_decode`` that needed the
compression returns 1 and ``rkv_get_failure`` says why, ``Llama`` raises with it.
"""
from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from rkv_local import Llama, _native
from engine_helpers import last_logits, random_tokens
from test_iswa import make_llm as make_iswa_llm, model_path as iswa_model_path

BUDGET, BUFFER, WINDOW = 32, 16, 4


def make(path) -> Llama:
    return Llama(str(path), kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW, n_threads=2, verbose=False)


def kept_positions(llm: Llama) -> list[list[int]]:
    ctx = llm._ctx.ctx
    n_head_kv = llama_cpp.llama_model_n_head_kv(llm._model.model)
    return [_native.kept_positions(ctx, il, h).tolist() for il in _native.compressed_layers(ctx) for h in range(n_head_kv)]


def fill(llm: Llama, seed: int) -> list[int]:
    """Evaluate past one compression, up to the point where the next token needs another."""
    tokens = random_tokens(BUDGET + 2 * BUFFER, seed=seed)
    for i in range(0, len(tokens), BUFFER):
        llm.eval(tokens[i:i + BUFFER])
    assert llm.kv_stats().compressions == 1
    assert llm.kv_stats().cells_used == BUDGET + BUFFER
    return tokens


@pytest.mark.parametrize("hook", ["scoring", "compaction:0"])
def test_a_compression_failing_before_anything_moved_leaves_the_cache_as_it_was(tiny_model, monkeypatch, hook):
    path = tiny_model(arch="llama", n_layer=3, n_head=4, n_head_kv=2, head_dim=32)
    llm = make(path)
    tokens = fill(llm, seed=11)
    before, kept_before = llm.kv_stats(), kept_positions(llm)

    monkeypatch.setenv("RKV_TEST_FAIL", hook)
    with pytest.raises(_native.RkvError, match="RKV_TEST_FAIL"):
        llm.compress_now()
    nxt = 1234
    with pytest.raises(RuntimeError, match="KV compression failed: RKV_TEST_FAIL"):
        llm.eval([nxt])
    after = llm.kv_stats()
    assert (after.compressions, after.cells_used, after.n_tokens) == (before.compressions, before.cells_used,
                                                                      before.n_tokens)
    assert after.compressions_failed == 2
    assert llm.n_tokens == len(tokens)
    assert kept_positions(llm) == kept_before

    # the failure is gone with its cause: the same tokens give what a Llama that never failed gives
    monkeypatch.delenv("RKV_TEST_FAIL")
    llm.eval([nxt])
    assert _native.compression_failure(llm._ctx.ctx) == ""
    twin = make(path)
    fill(twin, seed=11)
    twin.eval([nxt])
    assert kept_positions(llm) == kept_positions(twin)
    np.testing.assert_array_equal(last_logits(llm), last_logits(twin))   # the same path twice: exact


def test_a_compaction_failing_midway_clears_the_sequence_and_refuses_it_until_cleared(tiny_model, monkeypatch):
    path = tiny_model(arch="llama", n_layer=3, n_head=4, n_head_kv=2, head_dim=32)
    llm = make(path)
    tokens = fill(llm, seed=12)
    ctx = llm._ctx.ctx

    monkeypatch.setenv("RKV_TEST_FAIL", "compaction:1")   # layer 0 moves, layer 1 fails
    with pytest.raises(RuntimeError, match="layers below 1 had moved, so the sequence was cleared"):
        llm.eval([1234])
    stats = llm.kv_stats()
    assert (stats.cells_used, stats.n_tokens, stats.compressions_failed) == (0, 0, 1)
    assert llm.n_tokens == 0   # Llama forgets what the cache lost: the next call evaluates its prompt again

    # a decode straight through llama.cpp is refused while the sequence is not cleared (position 0
    # included: the owner must say it starts over)
    monkeypatch.delenv("RKV_TEST_FAIL")
    batch = llama_cpp.llama_batch_get_one((llama_cpp.llama_token * 1)(1234), 1)
    assert llama_cpp.llama_decode(ctx, batch) == 1
    assert "had moved" in _native.compression_failure(ctx)

    # cleared (Llama.eval truncates to its n_tokens first), the sequence is as a fresh one
    for i in range(0, len(tokens), BUFFER):
        llm.eval(tokens[i:i + BUFFER])
    twin = make(path)
    fill(twin, seed=12)
    assert _native.compression_failure(ctx) == ""
    assert kept_positions(llm) == kept_positions(twin)
    np.testing.assert_array_equal(last_logits(llm), last_logits(twin))


def test_a_failed_compaction_of_a_sliding_window_model_clears_both_caches(tiny_model, monkeypatch):
    llm = make_iswa_llm(iswa_model_path(tiny_model, "gpt-oss"))   # compressed layers 1 and 3: KV-cache layers 0, 1
    for i in range(4):   # budget 40, buffer 16: one compression, and full
        llm.eval(random_tokens(16, seed=i))
    assert llm.kv_stats().compressions == 1 and llm.kv_stats().kv_bytes_window > 0
    monkeypatch.setenv("RKV_TEST_FAIL", "compaction:1")
    with pytest.raises(RuntimeError, match="the sequence was cleared"):
        llm.eval(random_tokens(16, seed=99))
    stats = llm.kv_stats()
    assert (stats.cells_used, stats.kv_bytes_window, llm.n_tokens) == (0, 0, 0)
    assert llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm._ctx.ctx), 0) == -1
