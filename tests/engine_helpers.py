"""Helpers shared by the engine tests: driving a Llama token by token, and a numpy forward
pass of the tiny llama models (the reference for logits after a compaction)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

import rkv_local  # noqa: F401  (binds llama_cpp to our library first)
from rkv_local import _native, reference
import llama_cpp
from near_tie import top2_gap

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def greedy(llm: llama_cpp.Llama, n: int, gaps: Optional[list[float]] = None) -> list[int]:
    """Decode n tokens one at a time, always the most likely one; ``gaps``, if given, receives the gap
    between the two best logits of each (for ``near_tie.assert_same_greedy``)."""
    out = []
    for _ in range(n):
        logits = last_logits(llm)
        tok = int(np.argmax(logits))
        if gaps is not None:
            gaps.append(top2_gap(logits))
        out.append(tok)
        llm.eval([tok])
    return out


def random_tokens(n: int, seed: int, low: int = 100, high: int = 20000) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(low, high, size=n)]


def memory(llm: llama_cpp.Llama):
    return llama_cpp.llama_get_memory(llm._ctx.ctx)


@contextlib.contextmanager
def low_level_context(
    model, *, n_ctx: int, n_seq_max: int = 1, kv_unified: bool = False, n_batch: int = 64,
    flash_attn: int = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, n_threads: int = 2,
) -> Iterator[llama_cpp.llama_context_p]:
    params = llama_cpp.llama_context_default_params()
    params.flash_attn_type = flash_attn
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.kv_unified = kv_unified
    params.n_threads = params.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx, "llama.cpp could not create the context"
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


def decode(ctx, chunks: Sequence[tuple[int, Sequence[int], int]]) -> None:
    """One llama_decode call; chunks are (seq_id, tokens, position of the first token)."""
    n = sum(len(tokens) for _, tokens, _ in chunks)
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        i = 0
        for seq_id, tokens, pos0 in chunks:
            for j, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = pos0 + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = j == len(tokens) - 1
                i += 1
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)


def gguf_field(reader, key: str):
    """The value of a scalar metadata field of a ``gguf.GGUFReader``."""
    f = reader.fields[key]
    return f.parts[f.data[0]][0]


@dataclass
class TinyLlamaWeights:
    """The tensors of a tiny ``llama`` GGUF written by ``make_tiny_model``, in float64."""

    n_head: int
    n_head_kv: int
    head_dim: int
    eps: float
    rope_base: float
    tensors: dict[str, np.ndarray]

    @classmethod
    def load(cls, path: Path) -> "TinyLlamaWeights":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))

        def field(key: str):
            return gguf_field(reader, key)

        tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
        n_head = int(field("llama.attention.head_count"))
        return cls(
            n_head=n_head,
            n_head_kv=int(field("llama.attention.head_count_kv")),
            head_dim=int(field("llama.embedding_length")) // n_head,
            eps=float(field("llama.attention.layer_norm_rms_epsilon")),
            rope_base=float(field("llama.rope.freq_base")),
            tensors=tensors,
        )

    @property
    def n_layer(self) -> int:
        return sum(1 for name in self.tensors if name.endswith("attn_q.weight"))

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        # llama's "normal" RoPE rotates neighbouring pairs (2i, 2i+1)
        d = x.shape[-1]
        inv = self.rope_base ** (-np.arange(0, d, 2) / d)
        ang = pos[:, None, None] * inv[None, None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, tokens: list[int], visible,
                queries: Optional[list] = None) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """Logits of every token, and each layer's K and V ([n, n_head_kv, d]).

        ``visible(layer, kv_head, i)`` gives the positions token ``i`` attends to. ``queries``, if
        given, receives each layer's post-RoPE queries ([n, n_head, d]), unscaled.
        """
        t = self.tensors
        n, d, g = len(tokens), self.head_dim, self.n_head // self.n_head_kv
        x = t["token_embd.weight"][tokens]
        pos = np.arange(n, dtype=np.float64)
        ks, vs = [], []
        for layer in range(self.n_layer):
            blk = f"blk.{layer}"
            h = self._rms(x, t[f"{blk}.attn_norm.weight"])
            q = self._rope((h @ t[f"{blk}.attn_q.weight"].T).reshape(n, self.n_head, d), pos)
            k = self._rope((h @ t[f"{blk}.attn_k.weight"].T).reshape(n, self.n_head_kv, d), pos)
            v = (h @ t[f"{blk}.attn_v.weight"].T).reshape(n, self.n_head_kv, d)
            ks.append(k)
            vs.append(v)
            if queries is not None:
                queries.append(q)
            att = np.zeros((n, self.n_head, d))
            for i in range(n):
                for qh in range(self.n_head):
                    kh = qh // g
                    js = np.asarray(visible(layer, kh, i))
                    logit = k[js, kh] @ q[i, qh] / np.sqrt(d)
                    p = np.exp(logit - logit.max())
                    att[i, qh] = (p / p.sum()) @ v[js, kh]
            x = x + att.reshape(n, -1) @ t[f"{blk}.attn_output.weight"].T
            h = self._rms(x, t[f"{blk}.ffn_norm.weight"])
            gate = h @ t[f"{blk}.ffn_gate.weight"].T
            up = h @ t[f"{blk}.ffn_up.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ t[f"{blk}.ffn_down.weight"].T
        x = self._rms(x, t["output_norm.weight"])
        return x @ t["token_embd.weight"].T, ks, vs


def tri_inputs(ctx: int, calibration, layer: int, positions: list) -> Optional[reference.TriAttentionInputs]:
    """triattention's inputs for the spec (None without a calibration): the layer's statistics and
    RoPE, and the next query's position (after the newest cached token, by the heads' positions)."""
    if calibration is None:
        return None
    newest = max(int(p[-1]) for p in positions if len(p))
    return reference.TriAttentionInputs(calibration.stats(layer), _native.rope(ctx, layer), newest + 1)


def triattention_matches_reference(llm, budget: int, window: int) -> int:
    """Compress now and compare every layer with reference.select; the number of layers that differ."""
    ctx = llm._ctx.ctx
    n_layer, n_head, n_head_kv, d = shape_of(llm._model.model)
    params = reference.ScoringParams(budget=budget, window=window)
    before = []
    for layer in _native.compressed_layers(ctx):
        q, k, scale = _native.layer_inputs(ctx, layer, window, n_head * d, n_head_kv * d)
        positions = [_native.kept_positions(ctx, layer, h) for h in range(n_head_kv)]
        before.append((layer, q.reshape(window, n_head, d), k.reshape(-1, n_head_kv, d), scale, positions,
                       tri_inputs(ctx, llm._kv_calibration, layer, positions)))
    assert _native.compress(ctx)
    mismatches = 0
    for layer, q, k, scale, positions, tri in before:
        native = []
        for h in range(n_head_kv):
            after = _native.kept_positions(ctx, layer, h)
            native.append(np.searchsorted(positions[h], after))
            assert np.array_equal(positions[h][native[-1]], after)
        mismatches += not reference.kept_sets_equivalent("triattention", q, k, scale, params, native, tri=tri)
    return mismatches


@dataclass
class SpecWatch:
    """Compares the compressions of a context with reference.select while they run, through the
    engine's test hook (rkv_set_compression_observer): inputs before it scores, what it kept after."""

    ctx: int
    method: str
    shape: tuple[int, int, int, int]   # n_layer, n_head, n_head_kv, head_dim
    params: reference.ScoringParams
    layers: Optional[list[int]] = None  # the compressed layers (default: all)
    calibration: Any = None             # triattention's (rkv_local.calibration.Calibration)
    every: int = 1                      # compare every Nth compression of a sequence
    compressions: dict[int, int] = field(default_factory=dict)   # per sequence
    compared: int = 0
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
        self.compressions[seq_id] = self.compressions.get(seq_id, 0) + 1
        if (self.compressions[seq_id] - 1) % self.every:
            return
        n_layer, n_head, n_head_kv, d = self.shape
        window = self.params.window
        n_kept = _native.seq_stats(self.ctx, seq_id).cells_kept   # the kept prompt leads, unscored
        layers = []
        for layer in self.layers if self.layers is not None else range(n_layer):
            q, k, scale = _native.layer_inputs(self.ctx, layer, window, n_head * d, n_head_kv * d, seq_id=seq_id)
            positions = [_native.kept_positions(self.ctx, layer, h, seq_id) for h in range(n_head_kv)]
            layers.append((layer, q.reshape(window, n_head, d), k.reshape(-1, n_head_kv, d)[n_kept:], scale,
                           [p[n_kept:] for p in positions], tri_inputs(self.ctx, self.calibration, layer, positions)))
        self._inputs[seq_id] = (n_kept, layers)

    def _after(self, seq_id: int) -> None:
        if seq_id not in self._inputs:
            return
        n_kept, layers = self._inputs.pop(seq_id)
        self.compared += 1
        for layer, q, k, scale, positions, tri in layers:
            native = []
            for h in range(self.shape[2]):
                after = _native.kept_positions(self.ctx, layer, h, seq_id)[n_kept:]
                idx = np.searchsorted(positions[h], after)
                if len(after) != self.params.budget or not np.array_equal(positions[h][idx], after):
                    self.failures.append(f"sequence {seq_id} layer {layer} head {h}: kept {after}")
                    return
                native.append(idx)
            if not reference.kept_sets_equivalent(self.method, q, k, scale, self.params, native, tri=tri):
                self.failures.append(f"sequence {seq_id}, compression {self.compressions[seq_id]}, layer {layer}: "
                                     f"differs from reference.select")


def shape_of(model) -> tuple[int, int, int, int]:
    n_head = llama_cpp.llama_model_n_head(model)
    return (llama_cpp.llama_model_n_layer(model), n_head, llama_cpp.llama_model_n_head_kv(model),
            llama_cpp.llama_model_n_embd(model) // n_head)


def kv_bytes_per_cell(llm) -> int:
    from rkv_local import _native

    return _native.bytes_per_cell(llm._ctx.ctx)


__all__ = [
    "GGML_TYPES", "SpecWatch", "TinyLlamaWeights", "greedy", "shape_of", "kv_bytes_per_cell", "last_logits", "memory", "random_tokens",
]
