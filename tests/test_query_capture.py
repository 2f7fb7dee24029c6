"""Query capture checked against an independent forward pass (numpy, float64): the engine's ring of
each layer must hold the post-RoPE queries of the last ``window`` tokens of the right sequence, in
time order, whatever the decode calls looked like (single tokens, ubatches longer than the
window, several sequences in one call). The reference's selection reads these queries, so a
capture bug would otherwise shift the engine and the spec alike.

Llama-layout models are followed through every layer; the interleaved sliding-window models
(gpt-oss, Gemma 3) through their first layer, made the full-attention (compressed) one."""
from __future__ import annotations

import numpy as np
import pytest

from rkv_local import Llama, _native
from engine_helpers import GGML_TYPES, TinyLlamaWeights, decode, gguf_field, low_level_context, random_tokens
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


def first_layer_queries(path, tokens: list[int]) -> tuple[np.ndarray, int, int, int]:
    """Layer 0's post-RoPE queries of a tiny gpt-oss or Gemma 3 model (numpy, float64), times the
    model's attention scale (Gemma 3 applies it to Q before the attention, gpt-oss in it); with
    (n_head, n_head_kv, head_dim). The first layer's queries depend on the embeddings and that layer alone."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def field(key: str):
        return gguf_field(reader, f"{arch}.{key}")

    t = {tensor.name: np.asarray(tensor.data, dtype=np.float64) for tensor in reader.tensors
         if tensor.name == "token_embd.weight" or tensor.name.startswith("blk.0.")}
    n_embd, n_head, n_head_kv = (int(field(k)) for k in ("embedding_length", "attention.head_count",
                                                          "attention.head_count_kv"))
    d, eps, base = n_embd // n_head, float(field("attention.layer_norm_rms_epsilon")), float(field("rope.freq_base"))

    def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    x = t["token_embd.weight"][tokens]
    if arch == "gemma3":
        x = x * np.sqrt(n_embd)
    q = rms(x, t["blk.0.attn_norm.weight"]) @ t["blk.0.attn_q.weight"].T
    if "blk.0.attn_q.bias" in t:
        q = q + t["blk.0.attn_q.bias"]
    q = q.reshape(len(tokens), n_head, d)
    if "blk.0.attn_q_norm.weight" in t:
        q = rms(q, t["blk.0.attn_q_norm.weight"])
    # NEOX RoPE (both archs) rotates the pairs (i, i + d/2)
    ang = np.arange(len(tokens))[:, None, None] * base ** (-np.arange(0, d, 2) / d)[None, None, :]
    lo, hi = q[..., : d // 2], q[..., d // 2:]
    q = np.concatenate([lo * np.cos(ang) - hi * np.sin(ang), lo * np.sin(ang) + hi * np.cos(ang)], axis=-1)
    return q / np.sqrt(d), n_head, n_head_kv, d


def iswa_model(tiny_model, arch: str):
    """Layer 0 made the full-attention layer (layer 1 slides), so that its queries can be computed
    from the embeddings alone."""
    return tiny_model(arch=arch, n_layer=2, n_head=4, n_head_kv=2, head_dim=32, swa_pattern=[False, True])


def assert_first_ring_holds(ctx, path, tokens: list[int], seq_id: int = 0) -> None:
    """Whichever of Q or the scale carries the model's attention scale, their product is fixed."""
    expected, n_head, n_head_kv, d = first_layer_queries(path, tokens)
    q, _, scale = _native.layer_inputs(ctx, 0, WINDOW, n_head * d, n_head_kv * d, seq_id=seq_id)
    got = q.reshape(WINDOW, n_head, d) * scale
    want = expected[-WINDOW:]
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-3, f"sequence {seq_id}: relative error {err:.2e}"
    assert np.abs(got - expected[-WINDOW - 1:-1]).max() / np.abs(want).max() > 0.1


@pytest.mark.parametrize("type_k,flash_attn", [("f16", False), ("f16", True), ("q8_0", True)])
@pytest.mark.parametrize("arch", ["gpt-oss", "gemma3"])
def test_an_iswa_models_full_attention_layer_captures_its_queries(tiny_model, arch, type_k, flash_attn):
    path = iswa_model(tiny_model, arch)
    llm = Llama(str(path), kv_budget=200, kv_buffer=32, kv_window=WINDOW, type_k=GGML_TYPES[type_k],
                type_v=GGML_TYPES[type_k] if flash_attn else GGML_TYPES["f16"], flash_attn=flash_attn,
                n_threads=2, verbose=False)
    assert llm.compressed_layers() == [0]
    tokens = random_tokens(27, seed=51)
    for chunk in (tokens[:20], *([tok] for tok in tokens[20:])):
        llm.eval(chunk)
    assert_first_ring_holds(llm._ctx.ctx, path, tokens)


@pytest.mark.parametrize("arch", ["gpt-oss", "gemma3"])
def test_an_iswa_model_gives_each_sequence_its_own_ring(tiny_model, arch):
    path = iswa_model(tiny_model, arch)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    try:
        with low_level_context(model, n_ctx=2 * 256, n_seq_max=2, n_batch=64) as ctx:
            _native.enable(ctx, _native.CompressionConfig(budget=100, buffer=32, window=WINDOW))
            seqs = {0: random_tokens(13, seed=52), 1: random_tokens(6, seed=53)}
            decode(ctx, [(s, toks, 0) for s, toks in seqs.items()])
            for step in range(4):   # one token of sequence 0, three of sequence 1, per call
                chunks = []
                for s, n_new in ((0, 1), (1, 3)):
                    new = random_tokens(n_new, seed=60 + 10 * step + s)
                    chunks.append((s, new, len(seqs[s])))
                    seqs[s].extend(new)
                decode(ctx, chunks)
            for s, toks in seqs.items():
                assert_first_ring_holds(ctx, path, toks, seq_id=s)
    finally:
        llama_cpp.llama_model_free(model)
