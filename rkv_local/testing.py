"""Tiny random-weight GGUF models for tests: ``make_tiny_model`` writes a file llama.cpp loads in
milliseconds, in the llama, qwen2, qwen3, gpt-oss or gemma3 layout (the architectures rkv-local
compresses; the last two with interleaved sliding-window attention) or in a few layouts it refuses
(``REFUSED_TINY_ARCHS``), for deterministic engine and refusal tests.
"""

from __future__ import annotations

import functools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .models import resolve_model

__all__ = ["REFUSED_TINY_ARCHS", "SUPPORTED_TINY_ARCHS", "TinyModelShape", "make_tiny_model",
           "sliding_window_layers"]


SUPPORTED_TINY_ARCHS = ("llama", "qwen2", "qwen3", "gpt-oss", "gemma3")
# Loadable by llama.cpp but not compressible by rkv-local; for refusal tests only.
REFUSED_TINY_ARCHS = ("gemma2", "mamba", "jamba", "bloom", "qwen2vl")

_DEFAULT_VOCAB_MODEL = "smollm2-135m"
_RMS_NORM_EPS = 1e-6
_ROPE_FREQ_BASE = 10000.0
_EMBEDDING_STD = 0.1  # logits = h . embedding (tied, or output.weight drawn alike): how peaked sampling is
_BIAS_STD = 0.02
_LAYER_NORM_EPS = 1e-5
_N_EXPERT = 4  # gpt-oss: experts per MoE layer
_N_EXPERT_USED = 2
# gpt-oss attention sinks: one logit per head that joins the softmax with no value.
# A query over N keys with unit-scale scores has a softmax denominator of about
# N * e^0.5 (about 50 for a 32-token window, 500 for 300 tokens), so sinks drawn
# around 3 with spread 2 range from negligible to dominant across heads.
_SINK_MEAN = 3.0
_SINK_STD = 2.0
_SSM_CONV_KERNEL = 4
_SSM_STATE_SIZE = 16
# Matrices with at least this many elements are stored as f16 to keep files
# small (in practice only the vocabulary-sized embedding); the rest stay f32
# so reference computations in Python see exactly what llama.cpp sees.
_F16_MIN_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _MetadataEntry:
    key: str
    value: Any
    value_type: Any  # gguf.GGUFValueType
    item_type: Any = None  # element type for arrays


@dataclass(frozen=True)
class TinyModelShape:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # gpt-oss: the width of each expert
    sliding_window: int | None = None  # iSWA archs only: the window of the sliding-window layers
    # iSWA archs only: None for the arch's default layout, else the
    # ``attention.sliding_window_pattern`` key (an int period or one bool per layer).
    swa_pattern: int | tuple[bool, ...] | None = None

    @property
    def n_embd(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def ssm_d_inner(self) -> int:
        return 2 * self.n_embd  # llama.cpp's Mamba supports only an expansion factor of 2

    @property
    def ssm_dt_rank(self) -> int:
        return -(-self.n_embd // 16)


def _field_to_entry(field: Any) -> _MetadataEntry:
    from gguf import GGUFValueType

    value_type = field.types[0]
    if value_type == GGUFValueType.STRING:
        # Raw bytes: copies tokens exactly even when they are not valid UTF-8.
        return _MetadataEntry(field.name, field.parts[field.data[0]].tobytes(), value_type)
    if value_type != GGUFValueType.ARRAY:
        return _MetadataEntry(field.name, field.contents(), value_type)
    if len(field.types) != 2:
        raise ValueError(f"nested array metadata {field.name!r} is not supported")
    item_type = field.types[1]
    if item_type == GGUFValueType.STRING:
        items = [field.parts[i].tobytes() for i in field.data]
    else:
        items = field.contents()
    return _MetadataEntry(field.name, items, value_type, item_type)


@functools.lru_cache(maxsize=4)
def _tokenizer_metadata_cached(path: str, size: int, mtime_ns: int) -> tuple[_MetadataEntry, ...]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return tuple(
        _field_to_entry(field)
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.")
    )


def _tokenizer_metadata(path: Path) -> tuple[_MetadataEntry, ...]:
    """All ``tokenizer.*`` keys of a GGUF (cached: parsing a real model takes a while)."""
    stat = path.stat()
    entries = _tokenizer_metadata_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if not any(entry.key == "tokenizer.ggml.tokens" for entry in entries):
        raise ValueError(f"{path} has no tokenizer.ggml.tokens; cannot borrow its vocabulary")
    return entries


def _vocab_size(entries: Sequence[_MetadataEntry]) -> int:
    tokens = next(entry for entry in entries if entry.key == "tokenizer.ggml.tokens")
    return len(tokens.value)


def _check_tiny_shape(shape: TinyModelShape) -> None:
    if shape.arch not in _TINY_ARCHS:
        raise ValueError(
            f"arch must be one of {SUPPORTED_TINY_ARCHS + REFUSED_TINY_ARCHS}, got {shape.arch!r}"
        )
    if _TINY_ARCHS[shape.arch].sliding_window is None:
        if shape.sliding_window is not None or shape.swa_pattern is not None:
            raise ValueError(f"{shape.arch} has no sliding-window layers; sliding_window and swa_pattern must be None")
    else:
        if shape.sliding_window is None or shape.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {shape.sliding_window}")
        pattern = shape.swa_pattern
        if isinstance(pattern, tuple):
            if len(pattern) != shape.n_layer or not all(isinstance(x, bool) for x in pattern):
                raise ValueError(f"swa_pattern as a sequence needs one bool per layer ({shape.n_layer}), got {pattern}")
        elif pattern is not None and (isinstance(pattern, bool) or pattern < 0):
            raise ValueError(f"swa_pattern must be a non-negative int or one bool per layer, got {pattern!r}")
        if not any(sliding_window_layers(shape.arch, shape.n_layer, pattern)):
            # llama.cpp would abort (GGML_ASSERT(is_swa_any)) creating the context.
            raise ValueError(f"swa_pattern {pattern!r} leaves no sliding-window layer in {shape.n_layer}")
    for field_name in ("n_layer", "n_head", "n_head_kv", "head_dim", "n_ff"):
        if getattr(shape, field_name) < 1:
            raise ValueError(f"{field_name} must be positive, got {getattr(shape, field_name)}")
    if shape.n_head % shape.n_head_kv != 0:
        raise ValueError(
            f"n_head ({shape.n_head}) must be a multiple of n_head_kv ({shape.n_head_kv})"
        )
    if shape.head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {shape.head_dim}")


def _linear(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    # numpy (n_out, n_in) is ggml {n_in, n_out}; 1/sqrt(fan_in) keeps outputs ~unit scale.
    return rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(np.sqrt(n_in))


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _swa_pattern_argument(swa_pattern: int | Sequence[bool] | None) -> int | tuple[bool, ...] | None:
    if isinstance(swa_pattern, np.integer):
        return int(swa_pattern)
    if swa_pattern is None or isinstance(swa_pattern, int):
        return swa_pattern
    return tuple(bool(x) if isinstance(x, np.bool_) else x for x in swa_pattern)


def sliding_window_layers(
    arch: str, n_layer: int, swa_pattern: int | Sequence[bool] | None = None
) -> tuple[bool, ...]:
    """Which layers of a ``make_tiny_model`` file llama.cpp makes sliding-window.

    Mirrors llama.cpp's ``load_swa_pattern``: an int period ``p`` (``None``:
    the arch's own, 2 for gpt-oss and gemma2, 6 for gemma3) makes layer ``il``
    sliding-window when ``p == 0 or il % p < p - 1``, so the last layer of each
    period has full attention; a sequence gives one bool per layer.  All False
    for archs without sliding-window layers.
    """
    if arch not in _TINY_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_TINY_ARCHS + REFUSED_TINY_ARCHS}, got {arch!r}")
    spec = _TINY_ARCHS[arch]
    pattern = _swa_pattern_argument(swa_pattern)
    if spec.sliding_window is None:
        return (False,) * n_layer
    if pattern is None:
        pattern = spec.swa_pattern
    if isinstance(pattern, tuple):
        return pattern
    return tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))


def _storage(tensor: np.ndarray) -> np.ndarray:
    if tensor.ndim >= 2 and tensor.size >= _F16_MIN_ELEMENTS:
        return tensor.astype(np.float16)
    return tensor


# Layouts. A recipe lists tensors as (name, init, dims): dims name entries of
# _tiny_sizes in numpy order, (n_out, n_in) for matrices, and init says how
# _init fills them. Tensors are drawn in table order, so the tables also fix
# the random stream: reordering them changes every file written.
_Recipe = tuple[tuple[str, str, tuple[str, ...]], ...]

_EMBED: _Recipe = (("token_embd.weight", "embed", ("vocab", "embd")),)
_RMS_OUT: _Recipe = (("output_norm.weight", "ones", ("embd",)),)
_ATTN_NORM: _Recipe = (("attn_norm.weight", "ones", ("embd",)),)
_QKV: _Recipe = (
    ("attn_q.weight", "linear", ("embd", "embd")),
    ("attn_k.weight", "linear", ("embd_kv", "embd")),
    ("attn_v.weight", "linear", ("embd_kv", "embd")),
)
_QKV_BIAS: _Recipe = (
    ("attn_q.bias", "bias", ("embd",)),
    ("attn_k.bias", "bias", ("embd_kv",)),
    ("attn_v.bias", "bias", ("embd_kv",)),
)
_QK_NORM: _Recipe = (("attn_q_norm.weight", "ones", ("head",)), ("attn_k_norm.weight", "ones", ("head",)))
_ATTN_OUT: _Recipe = (("attn_output.weight", "linear", ("embd", "embd")),)
_POST_ATTN_NORM: _Recipe = (("post_attention_norm.weight", "ones", ("embd",)),)
_POST_FFW_NORM: _Recipe = (("post_ffw_norm.weight", "ones", ("embd",)),)
_SWIGLU: _Recipe = (
    ("ffn_norm.weight", "ones", ("embd",)),
    ("ffn_gate.weight", "linear", ("ff", "embd")),
    ("ffn_up.weight", "linear", ("ff", "embd")),
    ("ffn_down.weight", "linear", ("embd", "ff")),
)
_MAMBA: _Recipe = (
    ("ssm_in.weight", "linear", ("2*inner", "embd")),
    ("ssm_conv1d.weight", "linear", ("inner", "conv")),
    ("ssm_conv1d.bias", "bias", ("inner",)),
    ("ssm_x.weight", "linear", ("x_db", "inner")),
    ("ssm_dt.weight", "linear", ("inner", "dt_rank")),
    ("ssm_dt.bias", "bias", ("inner",)),
    ("ssm_a", "ssm_a", ("inner", "state")),
    ("ssm_d", "ones", ("inner",)),
    ("ssm_out.weight", "linear", ("embd", "inner")),
)
# gpt-oss: attention with biases and per-head sinks, then a routed mixture of
# experts (numpy (n_expert, n_out, n_in) is ggml {n_in, n_out, n_expert}).
_GPT_OSS_BLOCK: _Recipe = (
    *_ATTN_NORM,
    *_QKV,
    *_QKV_BIAS,
    *_ATTN_OUT,
    ("attn_output.bias", "bias", ("embd",)),
    ("attn_sinks.weight", "sink", ("n_head",)),
    *_POST_ATTN_NORM,
    ("ffn_gate_inp.weight", "linear", ("expert", "embd")),
    ("ffn_gate_inp.bias", "bias", ("expert",)),
    ("ffn_gate_exps.weight", "experts", ("expert", "ff", "embd")),
    ("ffn_gate_exps.bias", "bias", ("expert", "ff")),
    ("ffn_up_exps.weight", "experts", ("expert", "ff", "embd")),
    ("ffn_up_exps.bias", "bias", ("expert", "ff")),
    ("ffn_down_exps.weight", "experts", ("expert", "embd", "ff")),
    ("ffn_down_exps.bias", "bias", ("expert", "embd")),
)
_JAMBA_SSM_NORMS: _Recipe = (
    ("ssm_dt_norm.weight", "ones", ("dt_rank",)),
    ("ssm_b_norm.weight", "ones", ("state",)),
    ("ssm_c_norm.weight", "ones", ("state",)),
)
_LN = lambda name: ((f"{name}.weight", "ones", ("embd",)), (f"{name}.bias", "zeros", ("embd",)))  # noqa: E731
_BLOOM_BLOCK: _Recipe = (
    *_LN("attn_norm"),
    ("attn_qkv.weight", "linear", ("qkv", "embd")),
    ("attn_qkv.bias", "bias", ("qkv",)),
    ("attn_output.weight", "linear", ("embd", "embd")),
    ("attn_output.bias", "bias", ("embd",)),
    *_LN("ffn_norm"),
    ("ffn_up.weight", "linear", ("ff", "embd")),
    ("ffn_up.bias", "bias", ("ff",)),
    ("ffn_down.weight", "linear", ("embd", "ff")),
    ("ffn_down.bias", "bias", ("embd",)),
)


def _moe_keys(writer: Any, shape: TinyModelShape) -> None:
    writer.add_expert_count(_N_EXPERT)
    writer.add_expert_used_count(_N_EXPERT_USED)
    writer.add_expert_feed_forward_length(shape.n_ff)


def _ssm_keys(writer: Any, shape: TinyModelShape) -> None:
    writer.add_ssm_conv_kernel(_SSM_CONV_KERNEL)
    writer.add_ssm_inner_size(shape.ssm_d_inner)
    writer.add_ssm_state_size(_SSM_STATE_SIZE)
    writer.add_ssm_time_step_rank(shape.ssm_dt_rank)


def _mrope_sections(shape: TinyModelShape) -> list[int]:
    # Qwen2-VL splits head_dim / 2 rotary pairs 2:3:3 over time, height and width.
    half = shape.head_dim // 2
    return [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8, 0]


@dataclass(frozen=True)
class _TinyArch:
    """How to write one architecture: tensors, and metadata beyond the common keys."""

    top: _Recipe  # global tensors; without output.weight the embedding is tied
    blocks: tuple[_Recipe, ...]  # block i follows blocks[i % len(blocks)]
    attention: tuple[bool, ...] = (True,)  # per entry of blocks: attention (else a Mamba mixer)
    keys: Any = None  # callable(writer, shape) adding arch-specific metadata
    # Interleaved sliding-window (iSWA) archs: the default window, and llama.cpp's
    # default swa pattern for the arch (what it assumes without the key).
    sliding_window: int | None = None
    swa_pattern: int = 0


_TINY_ARCHS: dict[str, _TinyArch] = {
    "llama": _TinyArch(_EMBED + _RMS_OUT, (_ATTN_NORM + _QKV + _ATTN_OUT + _SWIGLU,)),
    "qwen2": _TinyArch(_EMBED + _RMS_OUT, (_ATTN_NORM + _QKV + _QKV_BIAS + _ATTN_OUT + _SWIGLU,)),
    "qwen3": _TinyArch(_EMBED + _RMS_OUT, (_ATTN_NORM + _QKV + _QK_NORM + _ATTN_OUT + _SWIGLU,)),
    # iSWA archs: the engine compresses their full-attention layers. Both have an
    # untied output matrix: llama.cpp requires one for gpt-oss; gemma3 may tie,
    # but its sqrt(n_embd) input scaling then makes a random model's greedy
    # answer repeat one token.
    "gpt-oss": _TinyArch(
        _EMBED + _RMS_OUT + (("output.weight", "embed", ("vocab", "embd")),),
        (_GPT_OSS_BLOCK,),
        keys=_moe_keys,
        sliding_window=32,
        swa_pattern=2,
    ),
    "gemma3": _TinyArch(
        _EMBED + _RMS_OUT + (("output.weight", "embed", ("vocab", "embd")),),
        (_ATTN_NORM + _QKV + _QK_NORM + _ATTN_OUT + _POST_ATTN_NORM + _SWIGLU + _POST_FFW_NORM,),
        sliding_window=32,
        swa_pattern=6,
    ),
    # Refused by the engine. gemma2: interleaved sliding-window attention (iSWA cache).
    "gemma2": _TinyArch(
        _EMBED + _RMS_OUT,
        (_ATTN_NORM + _QKV + _ATTN_OUT + _POST_ATTN_NORM + _SWIGLU + _POST_FFW_NORM,),
        sliding_window=64,
        swa_pattern=2,
    ),
    # mamba: recurrent state, no KV cache at all.
    "mamba": _TinyArch(_EMBED + _RMS_OUT, (_ATTN_NORM + _MAMBA,), attention=(False,), keys=_ssm_keys),
    # jamba: hybrid, Mamba blocks alternating with attention blocks.
    "jamba": _TinyArch(
        _EMBED + _RMS_OUT,
        (_ATTN_NORM + _MAMBA + _JAMBA_SSM_NORMS + _SWIGLU, _ATTN_NORM + _QKV + _ATTN_OUT + _SWIGLU),
        attention=(False, True),
        keys=_ssm_keys,
    ),
    # bloom: ALiBi biases instead of positions in K (plain KV cache).
    "bloom": _TinyArch(
        _EMBED + _LN("token_embd_norm") + _LN("output_norm"),
        (_BLOOM_BLOCK,),
        keys=lambda writer, shape: writer.add_layer_norm_eps(_LAYER_NORM_EPS),
    ),
    # qwen2vl: multi-axis positions (M-RoPE), otherwise qwen2.
    "qwen2vl": _TinyArch(
        _EMBED + _RMS_OUT,
        (_ATTN_NORM + _QKV + _QKV_BIAS + _ATTN_OUT + _SWIGLU,),
        keys=lambda writer, shape: writer.add_rope_dimension_sections(_mrope_sections(shape)),
    ),
}


def _tiny_sizes(shape: TinyModelShape, n_vocab: int) -> dict[str, int]:
    inner, dt_rank = shape.ssm_d_inner, shape.ssm_dt_rank
    return {
        "vocab": n_vocab, "embd": shape.n_embd, "embd_kv": shape.n_embd_kv, "head": shape.head_dim,
        "ff": shape.n_ff, "qkv": shape.n_embd + 2 * shape.n_embd_kv, "inner": inner, "2*inner": 2 * inner,
        "conv": _SSM_CONV_KERNEL, "state": _SSM_STATE_SIZE, "dt_rank": dt_rank,
        "x_db": dt_rank + 2 * _SSM_STATE_SIZE, "n_head": shape.n_head, "expert": _N_EXPERT,
    }


def _init(kind: str, rng: np.random.Generator, dims: tuple[int, ...]) -> np.ndarray:
    if kind == "embed":
        return _normal(rng, dims, _EMBEDDING_STD)
    if kind == "linear":
        return _linear(rng, *dims)
    if kind == "experts":  # a stack of independent linear maps, one per expert
        return rng.standard_normal(dims, dtype=np.float32) / np.float32(np.sqrt(dims[-1]))
    if kind == "sink":
        return _normal(rng, dims, _SINK_STD) + np.float32(_SINK_MEAN)
    if kind == "bias":
        return _normal(rng, dims, _BIAS_STD)
    if kind == "ones":  # norms start as identity
        return np.ones(dims, dtype=np.float32)
    if kind == "zeros":
        return np.zeros(dims, dtype=np.float32)
    if kind == "ssm_a":  # Mamba's S4D-real init: A[:, n] = -(n + 1), a stable decay
        return -np.broadcast_to(np.arange(1, dims[1] + 1, dtype=np.float32), dims).copy()
    raise AssertionError(f"unknown init {kind!r}")


def _tiny_tensors(
    shape: TinyModelShape, n_vocab: int, rng: np.random.Generator, shared_layers: bool = False
) -> list[tuple[str, np.ndarray]]:
    """All tensors in table order (the order also fixes the random stream). With ``shared_layers``
    the blocks of one layout share one draw of their tensors (a large model written in seconds)."""
    spec = _TINY_ARCHS[shape.arch]
    sizes = _tiny_sizes(shape, n_vocab)
    named = [(name, None, recipe) for name, *recipe in spec.top]
    for i in range(shape.n_layer):
        layout = i % len(spec.blocks)
        named += [(f"blk.{i}.{name}", (layout, name), recipe) for name, *recipe in spec.blocks[layout]]
    drawn: dict[tuple[int, str], np.ndarray] = {}
    out = []
    for name, key, (kind, dims) in named:
        if shared_layers and key in drawn:
            out.append((name, drawn[key]))
            continue
        tensor = _storage(_init(kind, rng, tuple(sizes[d] for d in dims)))
        if shared_layers and key is not None:
            drawn[key] = tensor
        out.append((name, tensor))
    return out


def _add_hparams(writer: Any, shape: TinyModelShape, n_vocab: int, n_ctx_train: int) -> None:
    spec = _TINY_ARCHS[shape.arch]
    attention = [spec.attention[i % len(spec.attention)] for i in range(shape.n_layer)]
    writer.add_name(f"rkv-local tiny {shape.arch}")
    writer.add_block_count(shape.n_layer)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    if any(attention):
        writer.add_head_count(shape.n_head)
        kv_heads = [shape.n_head_kv if a else 0 for a in attention]  # 0: a recurrent block
        writer.add_head_count_kv(shape.n_head_kv if all(attention) else kv_heads)
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_rope_freq_base(_ROPE_FREQ_BASE)
    else:
        writer.add_head_count(0)
        writer.add_head_count_kv(0)
    writer.add_layer_norm_rms_eps(_RMS_NORM_EPS)
    writer.add_vocab_size(n_vocab)
    if spec.sliding_window is not None:
        writer.add_sliding_window(shape.sliding_window)
        if shape.swa_pattern is not None:
            pattern = shape.swa_pattern
            writer.add_sliding_window_pattern(list(pattern) if isinstance(pattern, tuple) else pattern)
    if spec.keys is not None:
        spec.keys(writer, shape)


def make_tiny_model(
    path: str | os.PathLike[str],
    arch: str = "llama",
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int = 32,
    n_ff: int | None = None,
    n_ctx_train: int = 4096,
    seed: int = 0,
    vocab_from: str | os.PathLike[str] | None = None,
    sliding_window: int | None = None,
    swa_pattern: int | Sequence[bool] | None = None,
    chat_template: str | None = None,
    shared_layers: bool = False,
) -> Path:
    """Write a random-weight GGUF that llama.cpp can load; return its path.

    ``chat_template`` replaces the vocabulary model's ``tokenizer.chat_template``. ``shared_layers``
    gives every layer the same random weights (one draw): models of real sizes for speed
    measurements, whose decode does not depend on the weights' values.

    ``n_embd = n_head * head_dim``; ``n_ff`` defaults to ``4 * n_embd``.  The
    tokenizer (every ``tokenizer.*`` key) is copied from ``vocab_from``, a GGUF
    path or known model name (default: smollm2-135m, fetched if needed).
    Same arguments give a byte-identical file.

    ``arch`` is one of ``SUPPORTED_TINY_ARCHS`` or, for refusal tests only, of
    ``REFUSED_TINY_ARCHS``: gemma2 (sliding window), mamba (recurrent), jamba
    (hybrid: Mamba blocks alternate with attention), bloom (ALiBi), qwen2vl
    (M-RoPE).  Mamba blocks ignore the attention sizes and use
    ``d_inner = 2 * n_embd``.

    gpt-oss, gemma3 and gemma2 interleave sliding-window layers with
    full-attention ones (llama.cpp gives them an iSWA cache).
    ``sliding_window`` is their window (default: 32 for gpt-oss and gemma3,
    64 for gemma2).  ``swa_pattern`` writes
    ``{arch}.attention.sliding_window_pattern``: an int period ``p`` makes
    layer ``il`` sliding-window when ``p == 0 or il % p < p - 1``, a sequence
    gives one bool per layer (True: sliding-window); at least one layer must
    slide (llama.cpp aborts on a model with none).  Without it llama.cpp
    uses the arch's period: 2 for gpt-oss and gemma2 (even layers slide, odd
    ones have full attention), 6 for gemma3 (only layers 5, 11, ... have full
    attention, so a gemma3 with fewer than 6 layers has none unless
    ``swa_pattern`` says otherwise).  ``sliding_window_layers`` tells which
    layers slide.  Other archs take neither argument.  gemma3 has an untied
    output matrix.

    gpt-oss has attention biases, one attention-sink logit per head (drawn
    from a normal with mean 3 and standard deviation 2, so that some heads'
    sinks take much of the attention and others almost none), an untied
    output matrix, and a mixture of 4 experts (2 used per token) in place of
    the FFN; ``n_ff`` is then the width of each expert.
    """
    from gguf import GGUFWriter

    if sliding_window is None and arch in _TINY_ARCHS:
        sliding_window = _TINY_ARCHS[arch].sliding_window
    shape = TinyModelShape(
        arch=arch,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ff=n_ff if n_ff is not None else 4 * n_head * head_dim,
        sliding_window=sliding_window,
        swa_pattern=_swa_pattern_argument(swa_pattern),
    )
    _check_tiny_shape(shape)
    vocab_source = resolve_model(vocab_from if vocab_from is not None else _DEFAULT_VOCAB_MODEL)
    tokenizer = _tokenizer_metadata(vocab_source)
    n_vocab = _vocab_size(tokenizer)

    writer = GGUFWriter(None, arch)
    _add_hparams(writer, shape, n_vocab, n_ctx_train)
    for entry in tokenizer:
        if chat_template is not None and entry.key == "tokenizer.chat_template":
            continue
        writer.add_key_value(entry.key, entry.value, entry.value_type, entry.item_type)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, tensor in _tiny_tensors(shape, n_vocab, np.random.default_rng(seed), shared_layers):
        writer.add_tensor(name, tensor)
    return _write_atomically(writer, path)


def make_tiny_lora(
    path: str | os.PathLike[str],
    arch: str = "llama",
    n_layer: int = 2,
    n_embd: int = 128,
    rank: int = 4,
    alpha: float = 4.0,
    seed: int = 0,
) -> Path:
    """Write a random LoRA adapter GGUF for a tiny model of ``make_tiny_model`` (its ``arch``,
    ``n_layer`` and ``n_embd = n_head * head_dim``); return its path.

    It adapts every layer's query projection (``blk.N.attn_q.weight``), with weights large enough
    to change what a random model writes.
    """
    from gguf import GGUFWriter

    writer = GGUFWriter(None, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    rng = np.random.default_rng(seed)
    for layer in range(n_layer):
        # numpy shapes are GGUF's reversed: A is (rank, n_in), B (n_out, rank)
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_a", _normal(rng, (rank, n_embd), 1.0))
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_b", _normal(rng, (n_embd, rank), 1.0))
    return _write_atomically(writer, path)


def _write_atomically(writer: Any, path: str | os.PathLike[str]) -> Path:
    """Write beside the destination and rename, so a reader never sees half a file."""
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    # (Not mkstemp: its 0600 mode would carry over to the final file.)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, destination)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return destination
