"""Interleaved sliding-window models (gpt-oss, Gemma 3): the engine compresses the full-attention
layers' cache and leaves the window layers' cache to llama.cpp.

On tiny random gpt-oss (attention sinks, every other layer a 32-token window) and Gemma 3 (five
window layers to one global) models: the native selection equals the reference's with the
model's sink logits, generation far past the budget stays within it while the window cache stays
at llama.cpp's bound, and truncations and state reloads stay consistent across both caches.
"""
from __future__ import annotations

import numpy as np
import pytest

from rkv_local import Llama, _native, reference
import llama_cpp

from engine_helpers import GGML_TYPES, greedy, last_logits, memory, random_tokens
from near_tie import GapRecorder, assert_same_greedy, assert_same_unless_a_near_tie

BUDGET, BUFFER, WINDOW = 40, 16, 8
N_SWA = 32  # the tiny models' sliding window

# arch -> (make_tiny_model arguments, the full-attention layers llama.cpp gives them)
MODELS = {
    "gpt-oss": (dict(n_layer=4, n_head=4, n_head_kv=2, head_dim=32, sliding_window=N_SWA), [1, 3]),
    "gemma3": (dict(n_layer=6, n_head=4, n_head_kv=2, head_dim=32, sliding_window=N_SWA), [5]),
}


def model_path(tiny_model, arch: str):
    kwargs, _ = MODELS[arch]
    return tiny_model(arch=arch, **kwargs)


def make_llm(path, *, budget=BUDGET, buffer=BUFFER, method="rkv", type_kv="f16", flash_attn=False, **kw) -> Llama:
    return Llama(
        str(path), kv_budget=budget, kv_buffer=buffer, kv_method=method, kv_window=WINDOW,
        type_k=GGML_TYPES[type_kv], type_v=GGML_TYPES[type_kv] if flash_attn else GGML_TYPES["f16"],
        flash_attn=flash_attn, n_threads=1, verbose=False, **kw,
    )


def layer_sinks(path, layer: int) -> np.ndarray | None:
    from gguf import GGUFReader

    for tensor in GGUFReader(str(path)).tensors:
        if tensor.name == f"blk.{layer}.attn_sinks.weight":
            return np.asarray(tensor.data, dtype=np.float64)
    return None


def shape(llm: Llama) -> tuple[int, int, int]:
    model = llm._model.model
    n_head = llama_cpp.llama_model_n_head(model)
    return n_head, llama_cpp.llama_model_n_head_kv(model), llama_cpp.llama_model_n_embd(model) // n_head


def compress_and_compare(llm: Llama, path, method: str) -> tuple[int, int]:
    """Force a compression; compare every compressed layer's kept sets with the reference.

    Returns (mismatches with the model's sinks, heads whose reference selection without the sinks
    differs from the native one)."""
    n_head, n_head_kv, d = shape(llm)
    ctx = llm._ctx.ctx
    params = reference.ScoringParams(budget=BUDGET, window=WINDOW)
    before = {}
    for layer in llm.compressed_layers():
        q, k, scale = _native.layer_inputs(ctx, layer, WINDOW, n_head * d, n_head_kv * d)
        positions = [_native.kept_positions(ctx, layer, h) for h in range(n_head_kv)]
        before[layer] = (q.reshape(WINDOW, n_head, d), k.reshape(-1, n_head_kv, d), scale, positions)
    assert _native.compress(ctx)
    mismatches = sink_sensitive = 0
    for layer, (q, k, scale, positions) in before.items():
        native_idx = []
        for h in range(n_head_kv):
            after = _native.kept_positions(ctx, layer, h)
            assert len(after) == BUDGET
            idx = np.searchsorted(positions[h], after)
            assert np.array_equal(positions[h][idx], after), "kept a position that was not in the cache"
            native_idx.append(idx)
        sinks = layer_sinks(path, layer)
        if not reference.kept_sets_equivalent(method, q, k, scale, params, native_idx, sinks=sinks):
            mismatches += 1
        if sinks is not None:
            without = reference.select(method, q, k, scale, params)
            sink_sensitive += sum(not np.array_equal(a, b) for a, b in zip(without, native_idx))
    return mismatches, sink_sensitive


def test_only_the_full_attention_layers_are_compressed(tiny_model):
    for arch, (_, full_layers) in MODELS.items():
        llm = make_llm(model_path(tiny_model, arch))
        try:
            assert llm.compressed_layers() == full_layers
            window_layer = 0
            with pytest.raises(_native.RkvError, match="sliding-window layer"):
                llm.kept_positions(window_layer, 0)
        finally:
            llm.close()


CASES = [
    # arch, K/V type, flash attention, method
    ("gpt-oss", "f16", False, "rkv"),
    ("gpt-oss", "q8_0", True, "snapkv"),
    ("gpt-oss", "f16", True, "h2o"),
    ("gemma3", "f16", False, "rkv"),
    ("gemma3", "q8_0", True, "snapkv"),
]


@pytest.mark.parametrize("arch,type_kv,flash_attn,method", CASES)
def test_native_selection_equals_reference_with_sinks(tiny_model, arch, type_kv, flash_attn, method):
    path = model_path(tiny_model, arch)
    llm = make_llm(path, method=method, type_kv=type_kv, flash_attn=flash_attn)
    try:
        llm.eval(random_tokens(BUDGET + BUFFER, seed=21))
        sensitive = 0
        for round_ in range(4):
            if round_:
                greedy(llm, BUFFER)
                assert llm.kv_stats().cells_used == BUDGET + BUFFER
            mismatches, sink_sensitive = compress_and_compare(llm, path, method)
            assert mismatches == 0, f"round {round_ + 1}"
            sensitive += sink_sensitive
        if arch == "gpt-oss" and method != "h2o":
            # the sinks must matter for the comparison to mean anything (with one query, h2o's
            # ranking cannot change: the sink scales every candidate alike)
            assert sensitive > 0, "the sink logits changed no selection"
    finally:
        llm.close()


def test_gemma3_scores_with_the_pre_scaled_queries(tiny_model):
    # Gemma 3 scales Q before attention and passes a scale of 1: the engine must use that one, also
    # in a context restored from a state that compresses before it has built any graph
    path = model_path(tiny_model, "gemma3")
    llm = make_llm(path)
    restored = make_llm(path)
    try:
        llm.eval(random_tokens(BUDGET + BUFFER, seed=2))
        n_head, n_head_kv, d = shape(llm)
        _, _, scale = _native.layer_inputs(llm._ctx.ctx, 5, WINDOW, n_head * d, n_head_kv * d)
        assert scale == 1.0
        restored.load_state(llm.save_state())
        _, _, scale = _native.layer_inputs(restored._ctx.ctx, 5, WINDOW, n_head * d, n_head_kv * d)
        assert scale == 1.0
        # so the restored context keeps what the original keeps
        assert restored.compress_now() and llm.compress_now()
        for head in range(n_head_kv):
            np.testing.assert_array_equal(restored.kept_positions(5, head), llm.kept_positions(5, head))
    finally:
        llm.close()
        restored.close()


@pytest.mark.parametrize("arch", list(MODELS))
def test_generation_far_past_the_budget(tiny_model, arch):
    path = model_path(tiny_model, arch)
    prompt = random_tokens(24, seed=31)
    full = Llama(str(path), n_ctx=2048, n_batch=BUFFER, n_ubatch=BUFFER, n_threads=1, verbose=False)
    budgeted = make_llm(path)
    try:
        n_head, n_head_kv, d = shape(budgeted)
        # f16 K and V of every window layer
        window_bytes_per_cell = 2 * 2 * n_head_kv * d * (MODELS[arch][0]["n_layer"] - len(MODELS[arch][1]))
        full_bytes_per_cell = _native.bytes_per_cell(budgeted._ctx.ctx)
        assert full_bytes_per_cell == 2 * 2 * n_head_kv * d * len(MODELS[arch][1])
        for llm in (full, budgeted):
            llm.eval(prompt)
        # the same tokens until the first compression (a larger context: another n_kv, so another rounding)
        gaps: list[float] = []
        reference = greedy(full, BUDGET + BUFFER - len(prompt), gaps)
        assert_same_greedy(reference, gaps, greedy(budgeted, BUDGET + BUFFER - len(prompt)), arch)
        mem = memory(budgeted)
        n_steps = 20 * BUDGET
        window_cells_max = 0
        for step in range(n_steps):
            greedy(budgeted, 1)
            stats = budgeted.kv_stats()
            assert stats.cells_used <= BUDGET + BUFFER
            assert stats.kv_bytes_used == stats.cells_used * full_bytes_per_cell
            assert stats.kv_bytes_full == stats.n_tokens * full_bytes_per_cell
            window_cells = stats.kv_bytes_window // window_bytes_per_cell
            window_cells_max = max(window_cells_max, window_cells)
            # the window layers hold at least their window, from llama.cpp's own rule
            assert llama_cpp.llama_memory_seq_pos_min(mem, 0) <= stats.n_tokens - N_SWA
            assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == stats.n_tokens - 1
        stats = budgeted.kv_stats()
        assert stats.n_tokens == BUDGET + BUFFER + n_steps
        assert stats.compressions >= n_steps // BUFFER
        # llama.cpp sizes the window cache to PAD(n_swa + n_ubatch, 256) cells, whatever the length
        assert N_SWA <= window_cells_max <= 256
        assert np.all(np.isfinite(last_logits(budgeted)))
    finally:
        full.close()
        budgeted.close()


def test_truncations_respect_the_window_cache(tiny_model):
    """Before any compression, a truncation is refused exactly when the window layers have dropped
    tokens the next token would attend to; a refused one changes neither cache."""
    path = model_path(tiny_model, "gpt-oss")
    budget = 400  # no compression in this test: the window cache alone decides
    llm = make_llm(path, budget=budget)
    try:
        tokens = random_tokens(330, seed=41)
        llm.eval(tokens)
        assert llm.kv_stats().compressions == 0
        mem = memory(llm)
        pos_min = llama_cpp.llama_memory_seq_pos_min(mem, 0)
        assert pos_min > 0, "the window cache (256 cells) must have dropped the oldest tokens"
        # the logits of the last token evaluated alone (a batch rounds differently)
        llm.n_tokens -= 1
        llm.eval(tokens[-1:])
        logits = last_logits(llm)
        # the next token at p attends to [p - N_SWA + 1, p): refused when the window cache lost any of it
        for p0 in (1, pos_min + N_SWA - 2):
            assert not llama_cpp.llama_memory_seq_rm(mem, 0, p0, -1), p0
            assert llama_cpp.llama_memory_seq_pos_min(mem, 0) == pos_min
            assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == len(tokens) - 1
            assert llm.kv_stats().n_tokens == len(tokens)
        # the refused truncations left both caches as they were: the next token sees the same cache
        llm.n_tokens -= 1
        llm.eval(tokens[-1:])
        np.testing.assert_array_equal(last_logits(llm), logits)

        # a prompt that departs where the window is held reuses the cache; one that departs earlier
        # is evaluated from scratch; both answer as a fresh instance does
        fresh = make_llm(path, budget=budget)
        try:
            for keep in (pos_min + N_SWA + 10, 50):
                prompt = tokens[:keep] + random_tokens(6, seed=keep)
                answer = llm.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
                evaluated = llm.kv_stats().prompt_tokens_evaluated
                fresh.reset()
                expected = fresh.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
                assert answer == expected, keep
                # the last prompt token is evaluated again for its logits when nothing departs
                assert evaluated == (len(prompt) if keep == 50 else len(prompt) - keep), keep
                # back to the long sequence for the next case
                llm.reset()
                llm.eval(tokens)
        finally:
            fresh.close()
    finally:
        llm.close()


@pytest.mark.parametrize("arch", list(MODELS))
def test_state_reload_and_truncate(tiny_model, arch):
    path = model_path(tiny_model, arch)
    prompt = random_tokens(30, seed=51)

    straight = make_llm(path)
    straight.eval(prompt)
    gaps: list[float] = []
    expected = greedy(straight, 200, gaps)
    straight.close()

    first = make_llm(path)
    first.eval(prompt)
    head = greedy(first, 120)
    stats = first.kv_stats()
    assert stats.compressions > 0
    state = first.save_state()
    first.close()

    second = make_llm(path)
    try:
        second.load_state(state)
        restored = second.kv_stats()
        assert (restored.n_tokens, restored.cells_used, restored.pos_compacted, restored.kv_bytes_window) == (
            stats.n_tokens, stats.cells_used, stats.pos_compacted, stats.kv_bytes_window)
        mem = memory(second)
        assert llama_cpp.llama_memory_seq_pos_min(mem, 0) <= stats.n_tokens - N_SWA
        # a restored state has no logits: decode its last token again, as Llama.generate does
        second.n_tokens -= 1
        second.eval([head[-1]])
        # a restored window cache may hold its cells in other slots: another order of summation
        assert_same_greedy(expected, gaps, head + greedy(second, 80), arch)

        # truncating the reloaded sequence into its compressed part is refused, and a prompt that
        # departs there is evaluated from scratch, as a fresh instance would
        tokens = prompt + expected
        assert not llama_cpp.llama_memory_seq_rm(mem, 0, 40, -1)
        departing = tokens[:40] + random_tokens(5, seed=52)
        answer = second.create_completion(departing, max_tokens=10, temperature=0.0)["choices"][0]["text"]
        assert second.kv_stats().prompt_tokens_evaluated == len(departing)
        fresh = make_llm(path)
        try:
            assert answer == fresh.create_completion(departing, max_tokens=10, temperature=0.0)["choices"][0]["text"]
        finally:
            fresh.close()
    finally:
        second.close()


def test_a_model_whose_every_layer_has_a_window_is_refused(tiny_model):
    # nothing grows past the window: there is nothing to compress
    path = tiny_model(arch="gemma3", n_layer=2, sliding_window=N_SWA)  # pattern 6: layers 0 and 1 slide
    with pytest.raises(ValueError, match="every attention layer of this model uses a sliding window"):
        make_llm(path)


def test_sequences_in_a_batch_decode_in_their_own_streams(tiny_model):
    """Three gpt-oss sequences in one context, each in its own stream of both caches: each answers as
    it does alone until its first compression. (After it, the tiny model's f32 weights make a batch
    round differently from a lone token, depending on how the scheduler packed the calls, and a
    compression can turn that into another kept set: the answers may then part.)"""
    from rkv_local import BatchedLlama

    path = model_path(tiny_model, "gpt-oss")
    prompts = [random_tokens(20 + 7 * i, seed=60 + i) for i in range(3)]
    n_new = 3 * BUDGET
    settings = dict(kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW, flash_attn=True, n_threads=1)
    alone = Llama(str(path), verbose=False, **settings)
    try:
        before_compression, gaps = [], []
        for prompt in prompts:
            alone.reset()
            tokens, recorder = [], GapRecorder()
            for token in alone.generate(prompt, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([recorder])):
                tokens.append(token)
                if len(tokens) == BUDGET + BUFFER - len(prompt):
                    break
            before_compression.append(alone.detokenize(tokens).decode("utf-8", errors="ignore")[:-4])
            gaps.append(recorder.gaps)
    finally:
        alone.close()
    texts = ["", "", ""]
    compressions = window_bytes = 0
    with BatchedLlama(path, n_seq_max=3, **settings) as batch:
        for index, chunk in batch.stream_batch(prompts, max_tokens=n_new, temperature=0.0):
            texts[index] += chunk["choices"][0]["text"]
            for seq_id in range(3):
                stats = batch.kv_stats(seq_id)
                assert stats.cells_used <= BUDGET + BUFFER
                compressions = max(compressions, stats.compressions)
                window_bytes = max(window_bytes, stats.kv_bytes_window)
    for i, (text, prefix, gap) in enumerate(zip(texts, before_compression, gaps)):
        assert_same_unless_a_near_tie(prefix, gap, text[:len(prefix)], f"sequence {i}")
    assert compressions >= 3 and window_bytes > 0
