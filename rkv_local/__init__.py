"""rkv-local: R-KV decode-time KV-cache compression for llama.cpp.

``from rkv_local import Llama`` is llama-cpp-python's ``Llama`` with a budgeted KV cache.
Importing this package binds llama-cpp-python to rkv-local's own libllama.
"""
from __future__ import annotations

from ._library import load_bindings

llama_cpp = load_bindings()

from ._native import CompressionConfig, RkvError  # noqa: E402
from .llama import Llama  # noqa: E402
from .sequence import KVSequence, KVStats  # noqa: E402
from .batched import BatchedLlama  # noqa: E402

__all__ = ["BatchedLlama", "CompressionConfig", "KVSequence", "KVStats", "Llama", "RkvError", "llama_cpp"]
__version__ = "0.1.0"
