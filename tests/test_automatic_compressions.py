"""Every compression the engine runs on its own, compared with the spec: compressions triggered inside
llama_decode by single tokens, by prompt ubatches of kv_buffer tokens, and by calls that carry
several sequences (seq_id > 0), observed through the engine's test hook
(rkv_set_compression_observer): its inputs before it scores, what it kept after."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from rkv_local import Llama, _native, reference
from engine_helpers import decode, greedy, low_level_context, random_tokens
import llama_cpp

BUDGET, BUFFER, WINDOW = 40, 16, 8


@dataclass
class SpecWatch:
    """Compares each compression of a context with reference.select while it runs."""

    ctx: int
    method: str
    shape: tuple[int, int, int, int]   # n_layer, n_head, n_head_kv, head_dim
    params: reference.ScoringParams
    compressions: dict[int, int] = field(default_factory=dict)   # per sequence
    failures: list[str] = field(default_factory=list)
    _inputs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._callback = _native.CompressionObserver(self._observe)
        _native.set_compression_observer(self.ctx, self._callback)

    def close(self) -> None:
        _native.set_compression_observer(self.ctx, None)

    def _observe(self, _data, seq_id: int, phase: int) -> None:
        try:   # an exception cannot cross the C callback: keep it for the test
            (self._before if phase == 0 else self._after)(seq_id)
        except Exception as exc:  # noqa: BLE001
            self.failures.append(f"sequence {seq_id}, phase {phase}: {exc!r}")

    def _before(self, seq_id: int) -> None:
        n_layer, n_head, n_head_kv, d = self.shape
        layers = []
        for layer in range(n_layer):
            q, k, scale = _native.layer_inputs(self.ctx, layer, WINDOW, n_head * d, n_head_kv * d, seq_id=seq_id)
            positions = [_native.kept_positions(self.ctx, layer, h, seq_id) for h in range(n_head_kv)]
            layers.append((q.reshape(WINDOW, n_head, d), k.reshape(-1, n_head_kv, d), scale, positions))
        self._inputs[seq_id] = layers

    def _after(self, seq_id: int) -> None:
        n_head_kv = self.shape[2]
        self.compressions[seq_id] = self.compressions.get(seq_id, 0) + 1
        for layer, (q, k, scale, positions) in enumerate(self._inputs.pop(seq_id)):
            native = []
            for h in range(n_head_kv):
                after = _native.kept_positions(self.ctx, layer, h, seq_id)
                idx = np.searchsorted(positions[h], after)
                if len(after) != BUDGET or not np.array_equal(positions[h][idx], after):
                    self.failures.append(f"sequence {seq_id} layer {layer} head {h}: kept {after}")
                    return
                native.append(idx)
            if not reference.kept_sets_equivalent(self.method, q, k, scale, self.params, native):
                self.failures.append(f"sequence {seq_id}, compression {self.compressions[seq_id]}, layer {layer}: "
                                     f"differs from reference.select")


def shape_of(model) -> tuple[int, int, int, int]:
    n_head = llama_cpp.llama_model_n_head(model)
    return (llama_cpp.llama_model_n_layer(model), n_head, llama_cpp.llama_model_n_head_kv(model),
            llama_cpp.llama_model_n_embd(model) // n_head)


def watch_llama(llm: Llama, method: str) -> SpecWatch:
    return SpecWatch(llm._ctx.ctx, method, shape_of(llm._model.model),
                     reference.ScoringParams(budget=BUDGET, window=WINDOW))


@pytest.mark.parametrize("method", ["rkv", "snapkv", "h2o", "streamingllm"])
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
