"""ctypes bindings of native/rkv.h, the engine's C API."""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from typing import Iterator, Optional
from dataclasses import dataclass, field

import numpy as np

from ._library import loaded_library
from .reference import METHODS, Rope

# enum rkv_method (native/rkv.h) numbers the methods in the spec's order
METHOD_IDS = {name: i for i, name in enumerate(METHODS)}
# which kernels compress (enum rkv_kernels): "auto" the fused ones where the cache's backend has them
# (near-copy scan: CPU, CUDA; in-place K/V moves: CPU), "portable" always the stock ggml graphs
KERNELS_IDS = {"auto": 0, "portable": 1}
# CompressionConfig's default, so that any Llama (tests, benchmarks) can be put on the portable path
KERNELS_ENV = "RKV_KERNELS"
# enum rkv_redundancy_path
REDUNDANCY_PATHS = {0: "none", 1: "portable", 2: "cpu", 3: "cuda", 4: "host"}


class RkvParams(ctypes.Structure):
    _fields_ = [
        ("method", ctypes.c_int32),
        ("budget", ctypes.c_int32),
        ("buffer", ctypes.c_int32),
        ("window", ctypes.c_int32),
        ("kernel", ctypes.c_int32),
        ("sink", ctypes.c_int32),
        ("lambda_", ctypes.c_float),
        ("threshold", ctypes.c_float),
        ("kernels", ctypes.c_int32),
    ]


class RkvSeqStats(ctypes.Structure):
    _fields_ = [
        ("n_compressions", ctypes.c_int64),
        ("n_evicted", ctypes.c_int64),
        ("cells_used", ctypes.c_int64),
        ("cells_peak", ctypes.c_int64),
        ("kv_bytes_used", ctypes.c_int64),
        ("kv_bytes_full", ctypes.c_int64),
        ("n_tokens", ctypes.c_int64),
        ("pos_compacted", ctypes.c_int64),
        ("compress_seconds", ctypes.c_double),
        ("compute_buffer_bytes", ctypes.c_int64),
        ("kv_bytes_window", ctypes.c_int64),
        ("cells_window", ctypes.c_int64),
        ("cells_kept", ctypes.c_int64),
        ("paused", ctypes.c_int32),
        ("n_failed", ctypes.c_int64),
    ]


class RkvProfile(ctypes.Structure):
    _fields_ = [
        ("n_compressions", ctypes.c_int64),
        ("redundancy_path", ctypes.c_int32),
        ("fused_moves", ctypes.c_int32),
        ("build_seconds", ctypes.c_double),
        ("importance_seconds", ctypes.c_double),
        ("redundancy_seconds", ctypes.c_double),
        ("host_seconds", ctypes.c_double),
        ("compaction_seconds", ctypes.c_double),
        ("total_seconds", ctypes.c_double),
    ]


class RkvWindowCache(ctypes.Structure):
    _fields_ = [
        ("n_swa", ctypes.c_int32),
        ("cells", ctypes.c_int64),
        ("cells_used", ctypes.c_int64),
        ("bytes_per_cell", ctypes.c_int64),
    ]


class RkvRope(ctypes.Structure):
    _fields_ = [
        ("n_rot", ctypes.c_int32),
        ("neox", ctypes.c_int32),
        ("freq_base", ctypes.c_float),
        ("freq_scale", ctypes.c_float),
        ("ext_factor", ctypes.c_float),
        ("attn_factor", ctypes.c_float),
        ("beta_fast", ctypes.c_float),
        ("beta_slow", ctypes.c_float),
        ("n_ctx_orig", ctypes.c_int32),
        ("n_freq_factors", ctypes.c_int32),
    ]


# void (*)(void * user_data, llama_seq_id seq_id, int32_t phase)
CompressionObserver = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)


class RkvError(RuntimeError):
    """The engine refused a call; the message says why."""


@dataclass(frozen=True)
class CompressionConfig:
    """The engine's settings, field by field the C struct ``rkv_params`` (users set them through
    ``KVSettings``, which says what each means; ``kernel``, ``threshold``, ``sink`` and ``kernels`` are
    the engine's own)."""

    budget: int
    buffer: int = 128
    method: str = "rkv"
    window: int = 8
    lam: float = 0.1
    kernel: int = 7
    threshold: float = 0.5
    sink: int = 4
    kernels: str = field(default_factory=lambda: os.environ.get(KERNELS_ENV, "auto"))

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS_IDS:
            raise ValueError(f"unknown kernels {self.kernels!r} (from ${KERNELS_ENV}?); choose one of {', '.join(KERNELS_IDS)}")
        if self.method not in METHOD_IDS:
            raise ValueError(f"unknown kv_method {self.method!r}; choose one of {', '.join(METHOD_IDS)}")
        if self.window < 1:
            raise ValueError(f"kv_window must be at least 1, got {self.window}")
        if self.budget <= self.window:
            raise ValueError(f"kv_budget ({self.budget}) must exceed kv_window ({self.window})")
        if self.buffer < 1:
            raise ValueError(f"kv_buffer must be at least 1, got {self.buffer}")

    def to_struct(self) -> RkvParams:
        return RkvParams(
            METHOD_IDS[self.method], self.budget, self.buffer, self.window, self.kernel, self.sink,
            self.lam, self.threshold, KERNELS_IDS[self.kernels],
        )


def _bind():
    lib = loaded_library()
    ctx_p = ctypes.c_void_p
    sigs = {
        "rkv_params_default": ([], RkvParams),
        "rkv_enable": ([ctx_p, ctypes.POINTER(RkvParams)], ctypes.c_int32),
        "rkv_disable": ([ctx_p], None),
        "rkv_is_enabled": ([ctx_p], ctypes.c_bool),
        "rkv_last_error": ([], ctypes.c_char_p),
        "rkv_compress": ([ctx_p, ctypes.c_int32], ctypes.c_int32),
        "rkv_get_failure": ([ctx_p, ctypes.c_int32], ctypes.c_char_p),
        "rkv_set_kept_prompt": ([ctx_p, ctypes.c_int32, ctypes.c_int32], ctypes.c_int32),
        "rkv_set_paused": ([ctx_p, ctypes.c_int32, ctypes.c_bool], ctypes.c_int32),
        "rkv_set_compression_observer": ([ctx_p, CompressionObserver, ctypes.c_void_p], ctypes.c_int32),
        "rkv_kv_bytes_per_cell": ([ctx_p], ctypes.c_int64),
        "rkv_set_window_cache_for_budget": ([ctypes.c_bool], None),
        "rkv_get_window_cache": ([ctx_p, ctypes.c_int32, ctypes.POINTER(RkvWindowCache)], ctypes.c_int32),
        "rkv_get_layers": ([ctx_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32], ctypes.c_int32),
        "rkv_get_rope": ([ctx_p, ctypes.c_int32, ctypes.POINTER(RkvRope), ctypes.POINTER(ctypes.c_float), ctypes.c_int32],
                         ctypes.c_int32),
        "rkv_set_query_stats": ([ctx_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)],
                                ctypes.c_int32),
        "rkv_get_stats": ([ctx_p, ctypes.c_int32, ctypes.POINTER(RkvSeqStats)], ctypes.c_int32),
        "rkv_get_profile": ([ctx_p, ctypes.c_int32, ctypes.POINTER(RkvProfile)], ctypes.c_int32),
        "rkv_get_kept_positions": (
            [ctx_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32],
            ctypes.c_int32,
        ),
        "rkv_get_layer_inputs": (
            [ctx_p, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_float), ctypes.c_int32,
             ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.POINTER(ctypes.c_float)],
            ctypes.c_int32,
        ),
    }
    for name, (argtypes, restype) in sigs.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as exc:
            raise ImportError(
                f"the loaded libllama has no {name}: it was not built by rkv-local (rebuild with `make build`)"
            ) from exc
        fn.argtypes = argtypes
        fn.restype = restype
    return lib


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _bind()
    return _lib


def _check(rc: int) -> int:
    if rc < 0:
        raise RkvError(lib().rkv_last_error().decode() or "rkv call failed")
    return rc


def enable(ctx: int, config: CompressionConfig) -> None:
    params = config.to_struct()
    _check(lib().rkv_enable(ctx, ctypes.byref(params)))


def disable(ctx: int) -> None:
    lib().rkv_disable(ctx)


def is_enabled(ctx: int) -> bool:
    return bool(lib().rkv_is_enabled(ctx))


def compress(ctx: int, seq_id: int = 0) -> bool:
    """Compress a sequence now; False when it holds no more than the budget."""
    return _check(lib().rkv_compress(ctx, seq_id)) == 1


def compression_failure(ctx: int, seq_id: int = 0) -> str:
    """Why the sequence's last compression failed; "" when it did not."""
    why = lib().rkv_get_failure(ctx, seq_id)
    if why is None:
        _check(-1)
    return why.decode()


def set_kept_prompt(ctx: int, seq_id: int, n_tokens: int) -> None:
    """Never evict the sequence's first ``n_tokens`` positions (its prompt); 0 keeps none."""
    _check(lib().rkv_set_kept_prompt(ctx, seq_id, n_tokens))


def set_paused(ctx: int, seq_id: int, paused: bool) -> None:
    """Pause (or resume) a sequence's compression while the cache has room."""
    _check(lib().rkv_set_paused(ctx, seq_id, paused))


def set_compression_observer(ctx: int, observer: Optional["CompressionObserver"]) -> None:
    """Test hook: ``observer(None, seq_id, phase)`` at each compression, before it scores (phase 0)
    and after it compacted (1). Keep a reference to the ctypes callback while it is set."""
    _check(lib().rkv_set_compression_observer(ctx, observer or CompressionObserver(), None))


def bytes_per_cell(ctx: int) -> int:
    """K+V bytes of one cache cell over all layers."""
    return _check(lib().rkv_kv_bytes_per_cell(ctx))


@contextmanager
def window_cache_for_budget() -> Iterator[None]:
    """Contexts created inside (on this thread) give a sliding-window model's window cache the cells
    its window needs, even where that exceeds n_ctx (a budgeted context's budget + buffer)."""
    lib().rkv_set_window_cache_for_budget(True)
    try:
        yield
    finally:
        lib().rkv_set_window_cache_for_budget(False)


def window_cache(ctx: int, seq_id: int = 0) -> Optional[RkvWindowCache]:
    """The window cache of a sliding-window model (Gemma 3, gpt-oss); None for other models."""
    out = RkvWindowCache()
    return out if _check(lib().rkv_get_window_cache(ctx, seq_id, ctypes.byref(out))) else None


def compressed_layers(ctx: int) -> list[int]:
    """The model layers whose cache is compressed: every attention layer, or the full-attention
    ones of an interleaved sliding-window model (gpt-oss, Gemma 3)."""
    n = _check(lib().rkv_get_layers(ctx, None, 0))
    out = (ctypes.c_int32 * n)()
    _check(lib().rkv_get_layers(ctx, out, n))
    return list(out)


def rope(ctx: int, layer: int) -> Rope:
    """The RoPE llama.cpp applies in a model layer, as the spec describes it."""
    out = RkvRope()
    factors = np.zeros(4096, dtype=np.float32)
    _check(lib().rkv_get_rope(ctx, layer, ctypes.byref(out), factors.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                              factors.size))
    return Rope(n_rot=out.n_rot, neox=bool(out.neox), freq_base=out.freq_base, freq_scale=out.freq_scale,
                ext_factor=out.ext_factor, attn_factor=out.attn_factor, beta_fast=out.beta_fast,
                beta_slow=out.beta_slow, n_ctx_orig=out.n_ctx_orig,
                freq_factors=tuple(float(f) for f in factors[:out.n_freq_factors]) if out.n_freq_factors else None)


def set_query_stats(ctx: int, layer: int, centres: np.ndarray, abs_means: np.ndarray) -> None:
    """triattention's calibration of a compressed layer ([n_head, d] and [n_head, d/2])."""
    fp = ctypes.POINTER(ctypes.c_float)
    centres = np.ascontiguousarray(centres, dtype=np.float32)
    abs_means = np.ascontiguousarray(abs_means, dtype=np.float32)
    _check(lib().rkv_set_query_stats(ctx, layer, centres.ctypes.data_as(fp), abs_means.ctypes.data_as(fp)))


def seq_stats(ctx: int, seq_id: int = 0) -> RkvSeqStats:
    out = RkvSeqStats()
    _check(lib().rkv_get_stats(ctx, seq_id, ctypes.byref(out)))
    return out


def profile(ctx: int, seq_id: int = 0) -> RkvProfile:
    """Seconds per phase of a sequence's compressions, summed; redundancy_path of the last one."""
    out = RkvProfile()
    _check(lib().rkv_get_profile(ctx, seq_id, ctypes.byref(out)))
    return out


def kept_positions(ctx: int, layer: int, head: int, seq_id: int = 0) -> np.ndarray:
    """Positions of the tokens a layer's KV head holds, in time order."""
    n = _check(lib().rkv_get_kept_positions(ctx, seq_id, layer, head, None, 0))
    out = np.zeros(n, dtype=np.int32)
    _check(lib().rkv_get_kept_positions(
        ctx, seq_id, layer, head, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), n))
    return out


def layer_inputs(ctx: int, layer: int, window: int, n_embd_q: int, n_embd_k: int,
                 seq_id: int = 0, keys: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """(queries [window, n_embd_q], keys [n, n_embd_k], kq_scale) the next compression would score
    (``keys=False``: the queries only, keys empty)."""
    n_max = (1 << 16) if keys else 0
    queries = np.zeros((window, n_embd_q), dtype=np.float32)
    key_rows = np.zeros((n_max, n_embd_k), dtype=np.float32)
    scale = ctypes.c_float(0.0)
    fp = ctypes.POINTER(ctypes.c_float)
    n = _check(lib().rkv_get_layer_inputs(
        ctx, seq_id, layer, queries.ctypes.data_as(fp), queries.size, key_rows.ctypes.data_as(fp), key_rows.size,
        ctypes.byref(scale)))
    return queries, key_rows[:min(n, n_max)].copy(), scale.value
