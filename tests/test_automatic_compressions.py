"""Every compression the engine runs on its own, compared with the spec: compressions triggered inside
llama_decode by single tokens, by prompt ubatches of kv_buffer tokens, and by calls that carry
several sequences (seq_id > 0), observed through the engine's test hook
(rkv_set_compression_observer): its inputs before it scores, what it kept after."""
from __future__ import annotations

import numpy as np
import pytest

from rkv_local import Llama, _native, reference
from engine_helpers import SpecWatch, decode, greedy, low_level_context, random_tokens, shape_of
import llama_cpp

BUDGET, BUFFER, WINDOW = 40, 16, 8


def watch_llama(llm: Llama, method: str) -> SpecWatch:
    return SpecWatch(llm._ctx.ctx, method, shape_of(llm._model.model),
                     reference.ScoringParams(budget=BUDGET, window=WINDOW))


@pytest.mark.parametrize("method", ["rkv", "snapkv", "h2o", "streamingllm", "keydiff"])
def test_decoding_token_by_token(tiny_model, method):
    path = tiny_model(arch="qwen3", n_head=8, n_head_kv=2, head_dim=32)
    llm = Llama(str(path), kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW, kv_method=method,
                n_threads=2, verbose=False)
    watch = watch_llama(llm, method)
    llm.eval(random_tokens(20, seed=50))
    greedy(llm, 5 * (BUDGET + BUFFER))
    watch.close()
    assert not watch.failures, watch.failures[:3]
    assert watch.compressions == {0: llm.kv_stats().compressions} and watch.compressions[0] >= 5


def test_a_prompt_in_ubatches_of_the_buffer(tiny_model):
    """A long prompt: each decode call carries kv_buffer tokens, and compressions fall between them
    with the window's queries taken from the end of the previous ubatch."""
    path = tiny_model(arch="llama", n_head=4, n_head_kv=2, head_dim=32)
    llm = Llama(str(path), kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW, n_threads=2, verbose=False)
    watch = watch_llama(llm, "rkv")
    llm.eval(random_tokens(6 * (BUDGET + BUFFER) + 5, seed=51))
    watch.close()
    assert not watch.failures, watch.failures[:3]
    assert watch.compressions[0] == llm.kv_stats().compressions >= 5


def test_calls_that_carry_several_sequences(tiny_model):
    path = tiny_model(arch="llama", n_head=4, n_head_kv=2, head_dim=32)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    try:
        with low_level_context(model, n_ctx=3 * 256, n_seq_max=3, n_batch=3 * BUFFER,
                               flash_attn=llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED) as ctx:
            _native.enable(ctx, _native.CompressionConfig(budget=BUDGET, buffer=BUFFER, window=WINDOW))
            watch = SpecWatch(ctx, "rkv", shape_of(model), reference.ScoringParams(budget=BUDGET, window=WINDOW))
            lengths = [0, 0, 0]
            rng = np.random.default_rng(52)
            for step in range(40):
                chunks = []
                for s in range(3):
                    n_new = int(rng.integers(1, BUFFER + 1)) if rng.random() < 0.7 else 0
                    if n_new:
                        chunks.append((s, random_tokens(n_new, seed=1000 * step + s), lengths[s]))
                        lengths[s] += n_new
                if chunks:
                    decode(ctx, chunks)
            watch.close()
            assert not watch.failures, watch.failures[:3]
            for s in range(3):
                assert watch.compressions[s] == _native.seq_stats(ctx, s).n_compressions >= 5, s
    finally:
        llama_cpp.llama_model_free(model)
