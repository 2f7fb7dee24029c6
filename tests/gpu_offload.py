"""pytest plugin: with RKV_TEST_N_GPU_LAYERS set, every rkv_local.Llama the tests create offloads that
many layers (-1: all, so the KV cache lives on the GPU), unless the test passes n_gpu_layers itself.

    RKV_TEST_N_GPU_LAYERS=-1 PYTHONPATH=tests python -m pytest -p gpu_offload tests/test_engine.py

Used by scripts/gpu_check.sh; without the variable it changes nothing.
"""
from __future__ import annotations

import os


def pytest_configure(config) -> None:
    value = os.environ.get("RKV_TEST_N_GPU_LAYERS")
    if not value:
        return
    import rkv_local

    n_gpu_layers = int(value)
    init = rkv_local.Llama.__init__
    if getattr(init, "_rkv_offloaded", False):
        return

    def offloaded(self, *args, **kwargs):
        kwargs.setdefault("n_gpu_layers", n_gpu_layers)
        init(self, *args, **kwargs)

    offloaded._rkv_offloaded = True
    rkv_local.Llama.__init__ = offloaded
