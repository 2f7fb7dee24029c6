"""Setups the engine cannot compress are refused with a clear error, never a crash.

The refused architectures are tiny random models from ``make_tiny_model``
(``REFUSED_TINY_ARCHS``); cache layouts that any model can produce (a unified
cache shared by several sequences, a cache too small or already in use) are
built with llama.cpp's low-level API.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import pytest

from rkv_local import Llama, RkvError, _native
import llama_cpp

from engine_helpers import decode, last_logits, low_level_context, random_tokens

BUDGET, BUFFER = 64, 64


# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------

REFUSED = [
    ("gemma2", "soft-capping"),    # tanh-capped attention logits: the importance would not be the model's attention
    ("mamba", "recurrent"),        # recurrent state only
    ("jamba", "hybrid"),           # Mamba blocks alternating with attention blocks
    ("bloom", "ALiBi"),            # plain KV cache, but biases instead of positions in K
    ("qwen2vl", "M-RoPE"),         # plain KV cache, multi-axis positions
]


@pytest.mark.parametrize("arch,what", REFUSED)
def test_unsupported_architecture_is_refused(tiny_model, arch: str, what: str) -> None:
    path = str(tiny_model(arch=arch))
    with pytest.raises(ValueError, match=f"cannot compress this model's KV cache: .*(not support.*{what}|{what}.* not supported)"):
        Llama(path, kv_budget=BUDGET, verbose=False)

    # The refusal is about compression: the same file runs without a budget, in this same process.
    llm = Llama(path, n_ctx=256, n_batch=64, n_ubatch=64, n_threads=2, verbose=False)
    try:
        llm.eval(random_tokens(8, seed=1))
        assert np.all(np.isfinite(last_logits(llm)))
        ctx = llm._ctx.ctx
        # Engine calls on a context without compression answer with errors too.
        assert not _native.is_enabled(ctx)
        _native.disable(ctx)  # a no-op, whatever the memory
        with pytest.raises(RkvError, match="not enabled"):
            _native.seq_stats(ctx, 0)
        with pytest.raises(RkvError, match="not enabled"):
            _native.compress(ctx, 0)
        with pytest.raises(RkvError, match="not enabled"):
            _native.kept_positions(ctx, 0, 0)
        if arch in ("mamba", "jamba"):
            with pytest.raises(RkvError, match="not a plain attention KV cache"):
                _native.bytes_per_cell(ctx)
        else:
            assert _native.bytes_per_cell(ctx) > 0
    finally:
        llm.close()


def test_supported_architecture_with_the_same_settings_is_accepted(tiny_model) -> None:
    llm = Llama(str(tiny_model(arch="llama")), kv_budget=BUDGET, verbose=False)
    try:
        assert llm.kv_config is not None and llm.kv_config.budget == BUDGET
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# Cache layouts, through the low-level API
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_model(tiny_model) -> Iterator[llama_cpp.llama_model_p]:
    model = llama_cpp.llama_model_load_from_file(
        str(tiny_model(arch="llama")).encode(), llama_cpp.llama_model_default_params()
    )
    assert model, "llama.cpp could not load the tiny llama"
    yield model
    llama_cpp.llama_model_free(model)


def config(budget: int = BUDGET, buffer: int = BUFFER) -> _native.CompressionConfig:
    return _native.CompressionConfig(budget=budget, buffer=buffer)


@pytest.mark.parametrize("layout,cfg,message", [
    (dict(n_ctx=256, n_seq_max=2, kv_unified=True), config(), "unified cache .*several sequences"),
    (dict(n_ctx=256), config(budget=300), r"budget \+ buffer = 364.*n_ctx >= 364"),
    (dict(n_ctx=256, n_batch=128), config(), r"n_batch \(128\) exceeds the buffer \(64\)"),
])
def test_unsupported_cache_layout_is_refused(llama_model, layout: dict, cfg, message: str) -> None:
    with low_level_context(llama_model, **layout) as ctx:
        with pytest.raises(RkvError, match=message):
            _native.enable(ctx, cfg)
        assert not _native.is_enabled(ctx)


def test_unified_cache_with_one_sequence_is_accepted(llama_model) -> None:
    with low_level_context(llama_model, n_ctx=256, n_seq_max=1, kv_unified=True) as ctx:
        _native.enable(ctx, config())
        assert _native.is_enabled(ctx)


def test_cache_that_already_holds_tokens_is_refused(llama_model) -> None:
    with low_level_context(llama_model, n_ctx=256) as ctx:
        decode(ctx, [(0, random_tokens(10, seed=2), 0)])
        with pytest.raises(RkvError, match="already holds tokens"):
            _native.enable(ctx, config())
        assert not _native.is_enabled(ctx)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        _native.enable(ctx, config())  # an empty cache again
        assert _native.is_enabled(ctx)


def kept_sets(ctx, seq_id: int) -> list[np.ndarray]:
    """The kept positions of every KV head of layer 0 and 1 (the tiny llama's two layers)."""
    return [_native.kept_positions(ctx, layer, head, seq_id) for layer in range(2) for head in range(2)]


def test_two_sequences_in_separate_streams_compress_independently(llama_model) -> None:
    # Different lengths and chunk sizes, so the two sequences compress at different times.
    lengths, chunks = {0: 6 * BUFFER, 1: 6 * 48}, {0: BUFFER, 1: 48}
    tokens = {seq: random_tokens(lengths[seq], seed=10 + seq) for seq in (0, 1)}

    with low_level_context(llama_model, n_ctx=512, n_seq_max=2) as ctx:
        _native.enable(ctx, config())
        for start in range(6):
            for seq in (0, 1):
                pos = start * chunks[seq]
                decode(ctx, [(seq, tokens[seq][pos:pos + chunks[seq]], pos)])
        stats = {seq: _native.seq_stats(ctx, seq) for seq in (0, 1)}
        two_streams = {seq: kept_sets(ctx, seq) for seq in (0, 1)}
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_model))
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        assert np.all(np.isfinite(logits))

    for seq in (0, 1):
        s = stats[seq]
        assert s.n_tokens == lengths[seq]
        assert s.n_compressions > 0
        assert s.cells_used <= BUDGET + BUFFER
        for kept in two_streams[seq]:
            assert len(kept) == s.cells_used
            assert np.all(np.diff(kept) > 0) and kept[-1] == lengths[seq] - 1
    assert stats[0].n_evicted != stats[1].n_evicted

    # Sequence 1 alone, decoded in the same chunks, keeps exactly the same tokens.
    with low_level_context(llama_model, n_ctx=256) as ctx:
        _native.enable(ctx, config())
        for start in range(6):
            pos = start * chunks[1]
            decode(ctx, [(0, tokens[1][pos:pos + chunks[1]], pos)])
        alone = _native.seq_stats(ctx, 0)
        assert (alone.n_compressions, alone.cells_used) == (stats[1].n_compressions, stats[1].cells_used)
        for kept_alone, kept_shared in zip(kept_sets(ctx, 0), two_streams[1]):
            np.testing.assert_array_equal(kept_alone, kept_shared)


def test_two_sequences_sharing_decode_calls_both_stay_within_budget(llama_model) -> None:
    # Both sequences in every batch (32 + 32 tokens: at most `buffer` per call).
    half, steps = BUFFER // 2, 7
    tokens = {seq: random_tokens(half * steps, seed=20 + seq) for seq in (0, 1)}
    with low_level_context(llama_model, n_ctx=512, n_seq_max=2) as ctx:
        _native.enable(ctx, config())
        for step in range(steps):
            pos = step * half
            decode(ctx, [(seq, tokens[seq][pos:pos + half], pos) for seq in (0, 1)])
        for seq in (0, 1):
            s = _native.seq_stats(ctx, seq)
            assert s.n_tokens == half * steps
            assert s.n_compressions > 0
            assert s.cells_used <= BUDGET + BUFFER


@pytest.mark.parametrize("flash_attn", [llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED])
def test_sequences_sharing_decode_calls_keep_what_each_keeps_alone(llama_model, flash_attn: int) -> None:
    # A prompt chunk of one sequence beside single tokens of the other, as a batched server decodes
    lengths = {0: 6 * BUFFER, 1: 6 * BUFFER}
    tokens = {seq: random_tokens(lengths[seq], seed=30 + seq) for seq in (0, 1)}
    # the same cadence first (both compress in one memory update), then different ones
    chunks = {0: [BUFFER // 2] * 12, 1: [BUFFER // 2] * 4 + [1] * 40 + [BUFFER] * 3 + [24]}
    plan = {seq: list(itertools.accumulate([0] + chunks[seq])) for seq in (0, 1)}

    def run(seqs) -> tuple:
        """Kept positions of every head, and the logits after every call, of each sequence."""
        logits: dict = {seq: [] for seq in seqs}
        with low_level_context(llama_model, n_ctx=256 * len(seqs), n_seq_max=len(seqs), n_batch=BUFFER * len(seqs),
                               flash_attn=flash_attn) as ctx:
            _native.enable(ctx, config())
            n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llama_model))
            for step in range(max(len(chunks[s]) for s in seqs)):
                parts = []
                for slot, seq in enumerate(seqs):
                    if step < len(chunks[seq]):
                        a, b = plan[seq][step], plan[seq][step + 1]
                        parts.append((slot, tokens[seq][a:b], a))
                decode(ctx, parts)
                ends = itertools.accumulate(len(t) for _, t, _ in parts)
                for (slot, _, _), end in zip(parts, ends):
                    row = llama_cpp.llama_get_logits_ith(ctx, end - 1)
                    logits[seqs[slot]].append(np.ctypeslib.as_array(row, shape=(n_vocab,)).copy())
            return {seq: kept_sets(ctx, slot) for slot, seq in enumerate(seqs)}, logits

    kept_together, logits_together = run([0, 1])
    for seq in (0, 1):
        kept_alone, logits_alone = run([seq])
        for alone, shared in zip(kept_alone[seq], kept_together[seq]):
            np.testing.assert_array_equal(alone, shared)
        # batched matmuls may round differently in the last bits; a wrong K/V row moves logits far more
        for step, (alone, shared) in enumerate(zip(logits_alone[seq], logits_together[seq])):
            np.testing.assert_allclose(shared, alone, rtol=0, atol=5e-3, err_msg=f"sequence {seq}, call {step}")
