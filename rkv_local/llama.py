"""``Llama``: llama-cpp-python's ``Llama`` with an optional budgeted KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import llama_cpp
import numpy as np

from . import _native
from ._native import CompressionConfig

# the physical cache is rounded to this: llama.cpp attends to n_kv = PAD(used, 256) cells anyway
CACHE_PAD = 256


@dataclass(frozen=True)
class KVStats:
    """KV-cache figures of the (single) sequence of a ``Llama``."""

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


class Llama(llama_cpp.Llama):
    """Drop-in for ``llama_cpp.Llama``.

    Without ``kv_budget`` it is llama-cpp-python's ``Llama``, unchanged. With a budget, each
    layer and KV head keeps at most ``kv_budget`` tokens (plus ``kv_buffer`` decoded between two
    compressions): the physical cache holds ``kv_budget + kv_buffer`` cells while positions,
    ``max_tokens`` and the context run up to the logical ``n_ctx`` (default: the model's
    training context).
    """

    def __init__(
        self,
        model_path: str,
        *,
        kv_budget: Optional[int] = None,
        kv_buffer: int = 128,
        kv_method: str = "rkv",
        kv_window: int = 8,
        kv_lambda: float = 0.1,
        **kwargs: Any,
    ) -> None:
        self._kv_config: Optional[CompressionConfig] = None
        self._n_ctx_logical: Optional[int] = None
        if kv_budget is None:
            super().__init__(model_path, **kwargs)
            return

        config = CompressionConfig(
            budget=int(kv_budget), buffer=int(kv_buffer), method=kv_method, window=int(kv_window), lam=float(kv_lambda)
        )
        if kwargs.get("logits_all"):
            raise ValueError("logits_all (and so logprobs) is not supported with a kv_budget: "
                             "a logical context of logits would not fit the budget")
        for name in ("n_batch", "n_ubatch"):
            if kwargs.get(name, config.buffer) > config.buffer:
                raise ValueError(
                    f"{name} ({kwargs[name]}) exceeds kv_buffer ({config.buffer}): with a budget one decode call "
                    f"may carry at most kv_buffer tokens"
                )
        n_ctx_logical = kwargs.pop("n_ctx", 0) or 0
        n_batch = kwargs.pop("n_batch", config.buffer)
        n_ubatch = kwargs.pop("n_ubatch", n_batch)
        physical = -(-(config.budget + config.buffer) // CACHE_PAD) * CACHE_PAD
        super().__init__(model_path, n_ctx=physical, n_batch=n_batch, n_ubatch=n_ubatch, **kwargs)
        try:
            _native.enable(self._ctx.ctx, config)
        except _native.RkvError as exc:
            self.close()
            raise ValueError(f"cannot compress this model's KV cache: {exc}") from exc
        self._kv_config = config
        self._n_ctx_logical = int(n_ctx_logical) or self._model.n_ctx_train()
        self._n_ctx = self._n_ctx_logical
        self.input_ids = np.zeros((self._n_ctx_logical,), dtype=np.intc)

    def close(self) -> None:
        # settings refused before the parent's __init__ leave nothing to close
        if hasattr(self, "_stack"):
            super().close()

    @property
    def kv_config(self) -> Optional[CompressionConfig]:
        return self._kv_config

    def n_ctx(self) -> int:
        """The logical context: with a budget, longer than the physical cache."""
        if getattr(self, "_n_ctx_logical", None):
            return self._n_ctx_logical
        return super().n_ctx()

    def kv_stats(self) -> KVStats:
        cfg = self._kv_config
        if cfg is None:
            n = self.n_tokens
            per_cell = _native.bytes_per_cell(self._ctx.ctx)
            return KVStats("full", None, None, 0, 0, n, n, n * per_cell, n * per_cell, n, 0.0)
        s = _native.seq_stats(self._ctx.ctx, 0)
        return KVStats(
            cfg.method, cfg.budget, cfg.buffer, s.n_compressions, s.n_evicted, s.cells_used, s.cells_peak,
            s.kv_bytes_used, s.kv_bytes_full, s.n_tokens, s.compress_seconds,
        )

    def kept_positions(self, layer: int, head: int) -> np.ndarray:
        """Positions of the tokens that ``layer``'s KV ``head`` holds, oldest first."""
        if self._kv_config is None:
            return np.arange(self.n_tokens, dtype=np.int32)
        return _native.kept_positions(self._ctx.ctx, layer, head)

    def compress_now(self) -> bool:
        """Compress the cache to the budget now; False if it holds no more than the budget."""
        if self._kv_config is None:
            raise RuntimeError("this Llama has no kv_budget")
        return _native.compress(self._ctx.ctx, 0)
