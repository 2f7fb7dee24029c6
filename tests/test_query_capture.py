"""Query capture checked against an independent forward pass (numpy, float64): the engine's ring of
each layer must hold the post-RoPE queries of the last ``window`` tokens of the right sequence, in
time order, whatever the decode calls looked like (single tokens, ubatches longer than the
window, several sequences in one call). The reference's selection reads these queries, so a
capture bug would otherwise shift the engine and the spec alike."""
from __future__ import annotations

import numpy as np
import pytest

from rkv_local import Llama, _native
from engine_helpers import GGML_TYPES, TinyLlamaWeights, decode, low_level_context, random_tokens
import llama_cpp

WINDOW = 8


def reference_queries(weights: TinyLlamaWeights, tokens: list[int]) -> list[np.ndarray]:
    """Each layer's post-RoPE queries of every token, from the full causal forward pass."""
    queries: list[np.ndarray] = []
    weights.forward(tokens, lambda layer, h, i: np.arange(i + 1), queries=queries)
    return queries


def ring(ctx, weights: TinyLlamaWeights, layer: int, seq_id: int = 0) -> np.ndarray:
    d = weights.head_dim
    q, _, scale = _native.layer_inputs(ctx, layer, WINDOW, weights.n_head * d, weights.n_head_kv * d, seq_id=seq_id)
    assert scale == pytest.approx(1 / np.sqrt(d))
    return q.reshape(WINDOW, weights.n_head, d)


def assert_ring_holds(ctx, weights: TinyLlamaWeights, tokens: list[int], seq_id: int = 0,
                      layers: range | None = None, rtol: float = 2e-3) -> None:
    expected = reference_queries(weights, tokens)
    for layer in layers if layers is not None else range(weights.n_layer):
        want = expected[layer][-WINDOW:]
        got = ring(ctx, weights, layer, seq_id)
        scale = np.abs(want).max()
        err = np.abs(got - want).max() / scale
        assert err < rtol, f"layer {layer}, sequence {seq_id}: relative error {err:.2e}"
        # and not the queries of a neighbouring window (the check can tell them apart)
        shifted = expected[layer][-WINDOW - 1:-1]
        assert np.abs(got - shifted).max() / scale > 50 * rtol


@pytest.mark.parametrize("type_k,flash_attn", [("f32", False), ("f16", True), ("f16", False)])
def test_the_ring_holds_the_last_queries_after_single_tokens_and_long_ubatches(tiny_model, type_k, flash_attn):
    path = tiny_model(arch="llama", n_layer=3, n_head=4, n_head_kv=2, head_dim=32)
    weights = TinyLlamaWeights.load(path)
    llm = Llama(str(path), kv_budget=200, kv_buffer=32, kv_window=WINDOW, type_k=GGML_TYPES[type_k],
                type_v=GGML_TYPES[type_k] if flash_attn else GGML_TYPES["f16"], flash_attn=flash_attn,
                n_threads=2, verbose=False)
    tokens = random_tokens(27, seed=31)
    llm.eval(tokens)                 # one call of 27 tokens: only the last 8 reach the ring
    assert_ring_holds(llm._ctx.ctx, weights, tokens)
    for tok in random_tokens(5, seed=32):   # single tokens overwrite the oldest rows
        llm.eval([tok])
        tokens.append(tok)
    assert_ring_holds(llm._ctx.ctx, weights, tokens)


def test_a_quantized_k_cache_keeps_the_first_layers_queries_exact(tiny_model):
    """With q8_0 K the later layers' inputs carry its rounding; the first layer's queries do not."""
    path = tiny_model(arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=32)
    weights = TinyLlamaWeights.load(path)
    llm = Llama(str(path), kv_budget=64, kv_buffer=16, kv_window=WINDOW, type_k=GGML_TYPES["q8_0"],
                type_v=GGML_TYPES["q8_0"], flash_attn=True, n_threads=2, verbose=False)
    tokens = random_tokens(13, seed=33)
    llm.eval(tokens)
    assert_ring_holds(llm._ctx.ctx, weights, tokens, layers=range(1))


def test_each_sequence_has_its_own_ring_when_calls_mix_them(tiny_model):
    path = tiny_model(arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=32)
    weights = TinyLlamaWeights.load(path)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    try:
        with low_level_context(model, n_ctx=3 * 256, n_seq_max=3, n_batch=64,
                               flash_attn=llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED) as ctx:
            _native.enable(ctx, _native.CompressionConfig(budget=100, buffer=32, window=WINDOW))
            seqs = {s: random_tokens(n, seed=40 + s) for s, n in ((0, 11), (1, 20), (2, 9))}
            # the prompts in one call (20 tokens of sequence 1: longer than the window)
            decode(ctx, [(s, toks, 0) for s, toks in seqs.items()])
            for s, toks in seqs.items():
                assert_ring_holds(ctx, weights, toks, seq_id=s)
            # then calls that carry one token of some sequences and several of another
            rng = np.random.default_rng(41)
            for step in range(6):
                chunks = []
                for s, toks in seqs.items():
                    n_new = int(rng.integers(0, 4)) if s != step % 3 else 1
                    if n_new:
                        new = random_tokens(n_new, seed=100 * step + s)
                        chunks.append((s, new, len(toks)))
                        toks.extend(new)
                decode(ctx, chunks)
            for s, toks in seqs.items():
                assert_ring_holds(ctx, weights, toks, seq_id=s)
    finally:
        llama_cpp.llama_model_free(model)
