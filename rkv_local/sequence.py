"""One sequence of one llama.cpp context (``KVSequence``) and its figures (``KVStats``).

Everything the runtime does to a sequence's cache goes through its ``KVSequence``: truncate, clear,
compress, kept prompt and pause, kept positions, figures, why a compression failed, the sequence's
state as bytes. ``Llama`` holds one for sequence 0 of its own context; each ``BatchedLlama``
request holds one for its sequence of the shared context, whose lock keeps every call out of the
scheduler's decodes.
"""
from __future__ import annotations

import ctypes
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import llama_cpp
import numpy as np

from . import _native
from .settings import KVSettings


@dataclass(frozen=True)
class KVStats:
    """KV-cache figures of one sequence (``Llama``'s, a ``BatchedLlama`` request's), or summed over several.

    The engine's figures (``compressions`` to ``compress_seconds``, ``pos_compacted``) describe the
    sequence since it last started from an empty cache (construction, ``reset()``, or a prompt that
    had to be evaluated from scratch); ``load_state`` restores them. The ``*tokens_evaluated``
    counters are kept by ``Llama`` itself: they show how much of a prompt came from the cache.
    """

    method: str            # "full" without a budget
    budget: Optional[int]
    buffer: Optional[int]
    compressions: int
    evicted_tokens: int    # per layer and KV head, summed over compressions
    cells_used: int
    cells_peak: int
    kv_bytes_used: int
    kv_bytes_full: int     # what a full cache would hold for the same tokens
    n_tokens: int          # logical length of the sequence
    compress_seconds: float
    pos_compacted: int = -1           # position the compacted cells carry (-1: never compressed)
    tokens_evaluated: int = 0         # tokens decoded since this Llama was created
    prompt_tokens: int = 0            # length of the last prompt given to generate() (completions and chat too)
    prompt_tokens_evaluated: int = 0  # how many of them were decoded: the others were reused from the cache
    n_ctx: int = 0                    # the logical context (positions, max_tokens)
    cells_max: int = 0                # most cells the sequence may hold: kept prompt + budget + buffer (n_ctx
                                      # without a budget); more while kv_compress="think" pauses, as room allows
    # sliding-window models (gpt-oss, Gemma 3): the figures above are the full-attention layers' (the cache
    # that grows and is compressed); these are the window layers' cache, bounded by the window with or
    # without a budget: the bytes it holds now and the bytes allocated for the sequence (0 for other models)
    kv_bytes_window: int = 0
    kv_bytes_window_allocated: int = 0
    cells_kept: int = 0               # cells of the kept prompt (kv_keep_prompt), never evicted
    compression_paused: bool = False  # kv_compress="think": the thinking ended, the answer is not evicted
    compressions_failed: int = 0      # compressions that failed (each one an error of the call that ran it)

    # summed over sequences by KVStats.total; the others are settings, positions or a flag
    SUMMED = ("compressions", "evicted_tokens", "cells_used", "cells_peak", "kv_bytes_used", "kv_bytes_full",
              "n_tokens", "compress_seconds", "tokens_evaluated", "prompt_tokens", "prompt_tokens_evaluated",
              "kv_bytes_window", "kv_bytes_window_allocated", "cells_kept", "compressions_failed")

    @classmethod
    def total(cls, parts: Sequence["KVStats"], **fields: Any) -> "KVStats":
        """The sums over sequences; ``fields`` sets the rest (``cells_max`` of the whole context, ...)."""
        first = parts[0]
        sums = {name: sum(getattr(p, name) for p in parts) for name in cls.SUMMED}
        return cls(first.method, first.budget, first.buffer, **sums,
                   compression_paused=any(p.compression_paused for p in parts), **fields)


def window_figures(ctx: int, seq_id: int) -> dict[str, int]:
    """KVStats' window-cache fields for one sequence (zeros for a model without sliding-window layers)."""
    window = _native.window_cache(ctx, seq_id)
    if window is None:
        return {}
    return dict(kv_bytes_window=window.cells_used * window.bytes_per_cell,
                kv_bytes_window_allocated=window.cells * window.bytes_per_cell)


@dataclass(frozen=True)
class KVSequence:
    """Sequence ``seq_id`` of the context ``ctx`` (a ``llama_context`` pointer), compressed as
    ``settings`` say; ``cells``: what it may hold without a budget. Every call takes ``lock`` (none for
    a context of its own; the scheduler's ``between_decodes`` for a shared one)."""

    ctx: int
    seq_id: int
    settings: KVSettings
    cells: int
    lock: Callable[[], ContextManager[Any]] = nullcontext

    def _memory(self) -> Any:
        return llama_cpp.llama_get_memory(self.ctx)

    def _tokens_held(self) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory(), self.seq_id)) + 1

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(ctx, seq_id, *args)`` (an ``rkv_local._native`` function) on this sequence."""
        with self.lock():
            return fn(self.ctx, self.seq_id, *args)

    def truncate(self, p0: int, p1: int = -1) -> bool:
        """Remove positions [p0, p1) (p1 = -1: to the end); False when a compressed cache refuses: it
        can no longer hold what a fresh evaluation of the rest would (``rkv_set_kept_prompt`` in rkv.h)."""
        with self.lock():
            return bool(llama_cpp.llama_memory_seq_rm(self._memory(), self.seq_id, p0, p1))

    def clear(self) -> None:
        """Empty the sequence; a compressed one starts afresh, its figures too."""
        self.truncate(-1, -1)

    def tokens_held(self) -> int:
        """The sequence's length in the cache: its last position + 1."""
        with self.lock():
            return self._tokens_held()

    def compress(self) -> bool:
        """Compress to the budget now; False if it holds no more (``Llama.compress_now``)."""
        return self.call(_native.compress)

    def failure(self) -> str:
        """Why the last compression failed; "" when it did not."""
        return self.call(_native.compression_failure) if self.settings.compressed else ""

    def set_kept_prompt(self, n_tokens: int) -> None:
        self.call(_native.set_kept_prompt, n_tokens)

    def set_paused(self, paused: bool) -> None:
        self.call(_native.set_paused, paused)

    def kept_positions(self, layer: int, head: int, n_tokens: int) -> np.ndarray:
        """Positions of the tokens ``layer``'s KV ``head`` holds, oldest first (``n_tokens``: the
        sequence's length, all of which a full cache holds)."""
        if not self.settings.compressed:
            return np.arange(n_tokens, dtype=np.int32)
        return self.call(lambda ctx, seq_id: _native.kept_positions(ctx, layer, head, seq_id))

    def stats(self, *, n_ctx: int, n_tokens: Optional[int] = None, **counters: int) -> KVStats:
        """The sequence's figures: the engine's with a budget, else those of ``n_tokens`` (default:
        what the cache holds) in a full cache of ``cells`` cells; ``counters`` are the ``*tokens*``
        counters its owner keeps."""
        settings = self.settings
        with self.lock():
            if settings.compressed:
                s = _native.seq_stats(self.ctx, self.seq_id)
                return KVStats(settings.kv_method, settings.kv_budget, settings.kv_buffer, s.n_compressions,
                               s.n_evicted, s.cells_used, s.cells_peak, s.kv_bytes_used, s.kv_bytes_full, s.n_tokens,
                               s.compress_seconds, pos_compacted=s.pos_compacted, n_ctx=n_ctx,
                               cells_max=settings.kv_keep_prompt + settings.kv_budget + settings.kv_buffer,
                               cells_kept=s.cells_kept, compression_paused=bool(s.paused),
                               compressions_failed=s.n_failed, **window_figures(self.ctx, self.seq_id), **counters)
            n = self._tokens_held() if n_tokens is None else n_tokens
            try:
                per_cell = _native.bytes_per_cell(self.ctx)
            except _native.RkvError:  # no attention KV cache (recurrent, hybrid models)
                return KVStats("full", None, None, 0, 0, n, n, 0, 0, n, 0.0, n_ctx=n_ctx, cells_max=self.cells,
                               **counters)
            return KVStats("full", None, None, 0, 0, n, n, n * per_cell, n * per_cell, n, 0.0, n_ctx=n_ctx,
                           cells_max=self.cells, **window_figures(self.ctx, self.seq_id), **counters)

    def state_bytes(self) -> bytes:
        """The sequence's cache as llama.cpp saves one sequence (the engine's state of it included)."""
        with self.lock():
            n = llama_cpp.llama_state_seq_get_size(self.ctx, self.seq_id)
            buf = (ctypes.c_uint8 * n)()
            written = llama_cpp.llama_state_seq_get_data(self.ctx, buf, n, self.seq_id)
        if written != n:
            raise RuntimeError(f"llama.cpp wrote {written} bytes of a {n}-byte sequence state")
        return bytes(buf)

    def restore(self, state: bytes) -> None:
        """Replace the sequence's cache by one ``state_bytes`` gave (the same model and settings);
        on failure the sequence is empty and a RuntimeError says so."""
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        with self.lock():
            read = llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(state), self.seq_id)
            if read != len(state):
                llama_cpp.llama_memory_seq_rm(self._memory(), self.seq_id, -1, -1)
        if read != len(state):
            raise RuntimeError(f"llama.cpp could not restore the sequence state ({read} of {len(state)} bytes "
                               f"read); the sequence was cleared")
