"""llama.cpp's RPC backend: layers, and the KV caches that go with them, on ``rpc-server`` processes.

An ``rpc-server`` (built with the project, beside our libllama) holds the tensors given to it and
runs their part of each graph; llama.cpp treats it as a GPU. It is how a model larger than one
machine runs over several, and here, on loopback, it is the device whose memory the CPU cannot
touch: the path of every GPU user (the portable scoring graph, compaction through the backend).

``rpc-server`` has no authentication: run it on loopback or a trusted network only.

llama-cpp-python 0.3.36 has no argument for RPC servers. ``Llama(..., rpc_servers=[...])`` hands
llama.cpp the servers' devices through ``llama_model_params.devices`` (plus the local GPUs), for
that model only: nothing is registered process-wide, so other instances keep their devices.
"""
from __future__ import annotations

import contextlib
import ctypes
import socket
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import llama_cpp.llama_cpp as bindings

from ._library import LIB_NAME, library_path

__all__ = ["RpcServerError", "check_alive", "devices_for", "failed_servers", "rpc_server_path", "using_devices"]

CONNECT_TIMEOUT_S = 5.0
_DEVICE_TYPE_GPU, _DEVICE_TYPE_IGPU = 1, 2


class RpcServerError(ConnectionError):
    """An RPC server that does not answer, or that went away while in use."""


def rpc_server_path() -> Path:
    """The ``rpc-server`` program built with this package."""
    return library_path().parent / "rpc-server"


def _library(stem: str) -> ctypes.CDLL:
    path = library_path().parent / (stem + Path(LIB_NAME).suffix)
    if not path.exists():
        raise RpcServerError(f"{path} is missing: this build of rkv-local has no RPC backend (-DRKV_RPC=ON)")
    return ctypes.CDLL(str(path))


_lock = threading.Lock()
_api: Optional[tuple] = None


def _functions() -> tuple:
    """(ggml-rpc, ggml-base) with the prototypes we call, loaded once."""
    global _api
    with _lock:
        if _api is None:
            rpc, base = _library("libggml-rpc"), _library("libggml-base")
            rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
            rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
            rpc.ggml_backend_rpc_endpoint_failed.argtypes = [ctypes.c_char_p]
            rpc.ggml_backend_rpc_endpoint_failed.restype = ctypes.c_bool
            base.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
            base.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
            base.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            base.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
            base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
            base.ggml_backend_dev_type.restype = ctypes.c_int
            _api = (rpc, base)
        return _api


def check_alive(endpoint: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an endpoint nobody listens on (ggml's RPC client aborts the process on it)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rpc server {endpoint!r}: expected HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RpcServerError(f"rpc server {endpoint} does not answer ({exc.strerror or exc}); "
                             f"is rpc-server running there?") from None


def devices_for(endpoints: Sequence[str]) -> List[int]:
    """The devices of ``endpoints`` (each checked first), then the machine's own GPUs: what llama.cpp
    offloads to, in that order (``tensor_split`` follows it)."""
    rpc, base = _functions()
    devices: List[int] = []
    for endpoint in endpoints:
        check_alive(endpoint)
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise RpcServerError(f"rpc server {endpoint} offers no device")
        devices += [base.ggml_backend_reg_dev_get(reg, i) for i in range(base.ggml_backend_reg_dev_count(reg))]
    ggml = _library("libggml")
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        if base.ggml_backend_dev_type(dev) in (_DEVICE_TYPE_GPU, _DEVICE_TYPE_IGPU):
            devices.append(dev)
    return devices


def failed_servers(endpoints: Sequence[str]) -> List[str]:
    """Those of ``endpoints`` that went away while in use (their calls now answer zeros)."""
    if not endpoints:
        return []
    rpc, _ = _functions()
    return [e for e in endpoints if rpc.ggml_backend_rpc_endpoint_failed(e.encode())]


# llama-cpp-python builds its model parameters from llama_model_default_params() inside Llama.__init__
# and loads the model at once: the devices can only be given there. The wrapper is installed once and
# answers per thread, so that a model loaded meanwhile on another thread keeps llama.cpp's default.
_per_thread = threading.local()
_default_model_params = bindings.llama_model_default_params


def _model_params_with_devices() -> "bindings.llama_model_params":
    params = _default_model_params()
    devices = getattr(_per_thread, "devices", None)
    if devices is not None:
        params.devices = ctypes.cast(devices, ctypes.c_void_p)
    return params


bindings.llama_model_default_params = _model_params_with_devices


@contextlib.contextmanager
def using_devices(devices: Sequence[int]) -> Iterator[None]:
    """Models loaded by this thread inside the block offload to ``devices`` only."""
    array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)   # NULL-terminated
    _per_thread.devices = array
    try:
        yield
    finally:
        _per_thread.devices = None
