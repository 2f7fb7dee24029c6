"""Nothing leaks: 200 create / compress / save / load / free cycles leave resident memory and open
file descriptors where they were (issue 14, item 3).

Resident memory is read after a garbage collection and a heap trim (glibc's malloc_trim), once after
warm-up cycles (allocator arenas, ggml's and llama.cpp's one-time tables, the interpreter's caches)
and once after the 200 counted ones. A leak of one K/V cache, one state or one compute buffer per
cycle would be 200 times its size; the bound is a few MiB.
"""
from __future__ import annotations

import ctypes
import gc
import os
import sys
from pathlib import Path

import pytest

from rkv_local import Llama

from engine_helpers import random_tokens

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CYCLES, WARMUP = 200, 20
RSS_BOUND_MIB = 4.0
B, b = 32, 16


def resident_mib() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


def cycle(path: Path, i: int) -> None:
    llm = Llama(str(path), kv_budget=B, kv_buffer=b, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        llm.eval(random_tokens(3 * (B + b), seed=i % 7))  # compresses twice on the way
        assert llm.kv_stats().compressions > 0
        llm.compress_now()
        state = llm.save_state()
        llm.reset()
        llm.load_state(state)
        llm.eval(random_tokens(4, seed=100 + i % 7))
        assert llm.kv_stats().n_tokens == 3 * (B + b) + 4
    finally:
        llm.close()


def test_create_compress_save_load_free_cycles_leak_nothing(tiny_model) -> None:
    path = tiny_model(arch="llama")
    for i in range(WARMUP):
        cycle(path, i)
    fds_before, rss_before = open_fds(), resident_mib()
    for i in range(CYCLES):
        cycle(path, i)
    fds_after, rss_after = open_fds(), resident_mib()
    print(f"resident memory over {CYCLES} cycles: {rss_before:.1f} -> {rss_after:.1f} MiB "
          f"({rss_after - rss_before:+.2f} MiB)")
    assert fds_after == fds_before
    assert rss_after - rss_before < RSS_BOUND_MIB
