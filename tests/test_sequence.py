"""``KVSequence``, the one handle through which ``Llama`` and each ``BatchedLlama`` request touch
their sequence's cache: a request's cache calls act on its own sequence only, a sequence's state
moves between contexts as bytes, and a request whose compression fails gets its own error while the
requests decoded beside it go on.
"""
from __future__ import annotations

import numpy as np
import pytest

from rkv_local import BatchedLlama, Llama
from rkv_local.sequence import KVSequence
from engine_helpers import last_logits, random_tokens

BUDGET, BUFFER, WINDOW = 32, 16, 4
SETTINGS = dict(kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW)


@pytest.fixture
def tiny(tiny_model):
    return tiny_model(arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=32)


def evaluate(llm: Llama, tokens: list[int]) -> None:
    for i in range(0, len(tokens), BUFFER):
        llm.eval(tokens[i:i + BUFFER])


def test_a_sequence_state_moves_to_another_context_as_bytes(tiny):
    source = Llama(str(tiny), n_threads=2, verbose=False, **SETTINGS)
    tokens = random_tokens(3 * BUDGET, seed=5)
    evaluate(source, tokens)
    assert source.kv_stats().compressions >= 2
    state = source._sequence.state_bytes()

    target = Llama(str(tiny), n_threads=2, verbose=False, **SETTINGS)
    target._sequence.restore(state)
    assert target._sequence.tokens_held() == len(tokens)
    for layer in target.compressed_layers():
        for head in range(2):
            np.testing.assert_array_equal(target.kept_positions(layer, head), source.kept_positions(layer, head))
    # the restored cache continues as the original does (llama-cpp-python's history is the caller's)
    target.input_ids[:len(tokens)] = tokens
    target.n_tokens = len(tokens)
    source.eval([77])
    target.eval([77])
    np.testing.assert_array_equal(last_logits(target), last_logits(source))   # the same path twice: exact
    assert target.kv_stats().compressions == source.kv_stats().compressions

    with pytest.raises(RuntimeError, match="the sequence was cleared"):
        target._sequence.restore(state[: len(state) // 2])
    assert target._sequence.tokens_held() == 0


def test_a_request_reset_or_truncated_leaves_the_other_sequences_alone(tiny):
    batch = BatchedLlama(str(tiny), n_seq_max=2, n_ctx=256, verbose=False, **SETTINGS)
    try:
        with batch.sequence() as first, batch.sequence() as second:
            assert isinstance(first._sequence, KVSequence) and first.seq_id != second.seq_id
            first.create_completion(random_tokens(40, seed=1), max_tokens=30, temperature=0.0)
            second.create_completion(random_tokens(20, seed=2), max_tokens=5, temperature=0.0)
            held = batch.kv_stats(first.seq_id)
            assert held.cells_used > 0 and held.compressions > 0
            second.reset()                       # Llama.reset, on the view's own sequence
            assert second._ctx.kv_cache_seq_rm(-1, 0, -1)   # llama-cpp-python's call, the same
            assert batch.kv_stats(second.seq_id).cells_used == 0
            after = batch.kv_stats(first.seq_id)
            assert (after.cells_used, after.n_tokens, after.compressions) == (held.cells_used, held.n_tokens,
                                                                              held.compressions)
            assert first.kv_stats().cells_used == held.cells_used
    finally:
        batch.close()


def test_a_request_whose_compression_fails_gets_its_error_and_the_others_go_on(tiny, monkeypatch):
    short = random_tokens(8, seed=3)
    lone = Llama(str(tiny), n_threads=2, verbose=False, flash_attn=True, **SETTINGS)
    expected = lone.create_completion(short, max_tokens=6, temperature=0.0)["choices"][0]["text"]

    batch = BatchedLlama(str(tiny), n_seq_max=2, n_ctx=256, verbose=False, **SETTINGS)
    try:
        monkeypatch.setenv("RKV_TEST_FAIL", "compaction:1")   # moves layer 0, fails layer 1: the sequence is cleared
        results = batch.generate_batch([random_tokens(BUDGET + 2 * BUFFER, seed=4), short],
                                       max_tokens=6, temperature=0.0)
        assert isinstance(results[0], RuntimeError) and "the sequence was cleared" in str(results[0])
        assert results[1]["choices"][0]["text"] == expected   # never compressed: untouched by the failure
        assert batch.kv_stats().cells_used == 0               # both requests ended, both sequences emptied

        # the failed sequence is usable again once its request released it
        monkeypatch.delenv("RKV_TEST_FAIL")
        again = batch.generate_batch([random_tokens(BUDGET + 2 * BUFFER, seed=4)] * 2, max_tokens=6,
                                     temperature=0.0)
        assert all(isinstance(r, dict) for r in again), again
        assert again[0]["choices"][0]["text"] == again[1]["choices"][0]["text"]
    finally:
        batch.close()
