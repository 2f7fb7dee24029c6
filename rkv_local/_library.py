"""Points llama-cpp-python's bindings at the libllama built by this project.

llama-cpp-python reads ``LLAMA_CPP_LIB_PATH`` once, when ``llama_cpp`` is first
imported, so this module must run before that import.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

LIB_DIR = Path(__file__).resolve().parent / "lib"
LIB_NAME = {"darwin": "libllama.dylib", "win32": "llama.dll"}.get(sys.platform, "libllama.so")
BUILD_INFO_NAME = "build-info.json"
# ggml-vulkan reorders each graph's nodes for concurrency; with the engine's compressions that
# reordering corrupted memory on Mesa's lavapipe (README, "Vulkan"), so it is off unless asked for
VULKAN_NO_GRAPH_OPTIMIZE = "GGML_VK_DISABLE_GRAPH_OPTIMIZE"  # ggml reads its presence, not its value
VULKAN_GRAPH_OPTIMIZE_OPT_IN = "RKV_VULKAN_GRAPH_OPTIMIZE"


def library_path() -> Path:
    """The libllama this package loads: ``RKV_LOCAL_LIB_DIR`` or ``rkv_local/lib``."""
    override = os.environ.get("RKV_LOCAL_LIB_DIR")
    return (Path(override) if override else LIB_DIR) / LIB_NAME


def load_bindings():
    """Import ``llama_cpp`` bound to our library and return the module."""
    lib = library_path()
    if not lib.exists():
        raise ImportError(
            f"rkv-local's native library is missing ({lib}). Build it first: `make build` "
            "(or `pip install .`) in the rkv-local source folder."
        )
    already = sys.modules.get("llama_cpp.llama_cpp")
    if already is not None:
        loaded = Path(getattr(already._lib, "_name", "")).resolve()
        if loaded != lib.resolve():
            raise ImportError(
                f"llama_cpp was imported before rkv_local and is bound to {loaded}, not to rkv-local's "
                f"library {lib}. Import rkv_local first (before llama_cpp), or start a new interpreter."
            )
    else:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(lib.parent)
    if os.environ.get(VULKAN_GRAPH_OPTIMIZE_OPT_IN, "") in ("", "0"):
        os.environ.setdefault(VULKAN_NO_GRAPH_OPTIMIZE, "1")
    import llama_cpp

    return llama_cpp


def loaded_library() -> ctypes.CDLL:
    """The CDLL object llama-cpp-python loaded."""
    import llama_cpp.llama_cpp as bindings

    return bindings._lib


def build_info() -> dict:
    """The switches the native library was built with (``build-info.json`` beside it)."""
    path = library_path().parent / BUILD_INFO_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: rebuild rkv-local (`make build` or `pip install .`)") from None
