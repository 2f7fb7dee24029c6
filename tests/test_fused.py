"""The fused kernels (newest near-copy scan, in-place K/V moves) against the portable graphs and the reference.

Both paths score the same cache: the fused instance's state is loaded into a portable one
(RKV_KERNELS=portable) before every compression. With RKV_TEST_N_GPU_LAYERS=-1 (scripts/gpu_check.sh)
the caches live on the GPU and the fused path is the CUDA kernel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rkv_local import Llama, _native, reference
from engine_helpers import GGML_TYPES, greedy, random_tokens
from test_engine import BUDGET, BUFFER, CASES, WINDOW, model_shape

ROOT = Path(__file__).resolve().parents[1]
N_GPU_LAYERS = int(os.environ.get("RKV_TEST_N_GPU_LAYERS") or 0)
FUSED_PATH = "cuda" if N_GPU_LAYERS != 0 else "cpu"


def make(path, *, kernels, monkeypatch, type_kv="f16", flash_attn=False, budget=BUDGET, buffer=BUFFER) -> Llama:
    monkeypatch.setenv(_native.KERNELS_ENV, kernels)
    llm = Llama(
        str(path), kv_budget=budget, kv_buffer=buffer, kv_window=WINDOW,
        type_k=GGML_TYPES[type_kv], type_v=GGML_TYPES[type_kv] if flash_attn else GGML_TYPES["f16"],
        flash_attn=flash_attn, n_threads=2, n_gpu_layers=N_GPU_LAYERS, verbose=False,
    )
    monkeypatch.delenv(_native.KERNELS_ENV)
    assert llm.kv_config.kernels == kernels
    return llm


def compress_and_collect(llm: Llama):
    """Force a compression; (reference inputs per layer, kept order indices per layer and head)."""
    n_layer, n_head, n_head_kv, d = model_shape(llm)
    ctx = llm._ctx.ctx
    inputs, positions = [], []
    for layer in range(n_layer):
        q, k, scale = _native.layer_inputs(ctx, layer, WINDOW, n_head * d, n_head_kv * d)
        inputs.append((q.reshape(WINDOW, n_head, d), k.reshape(-1, n_head_kv, d), scale))
        positions.append([_native.kept_positions(ctx, layer, h) for h in range(n_head_kv)])
    assert _native.compress(ctx)
    kept = []
    for layer in range(n_layer):
        row = []
        for h in range(n_head_kv):
            after = _native.kept_positions(ctx, layer, h)
            idx = np.searchsorted(positions[layer][h], after)
            assert np.array_equal(positions[layer][h][idx], after)
            row.append(idx)
        kept.append(row)
    return inputs, kept


def near_copies(k: np.ndarray, threshold: float) -> int:
    """Keys ([n, n_head_kv, d]) with a near-copy (cosine above threshold with another key): where the
    redundancy rule spares the newest one, so a case built for the rule shows that it fired."""
    kn = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), reference.NORM_EPS)
    total = 0
    for h in range(k.shape[1]):
        sim = kn[:, h] @ kn[:, h].T
        np.fill_diagonal(sim, 0.0)
        total += int((sim > threshold).any(axis=1).sum())
    return total


def compare_paths(fused: Llama, portable: Llama, budget: int, rounds: int) -> tuple[int, int, int, int]:
    """Compress the same cache on both paths `rounds` times; (heads compared, heads kept identically,
    rounds whose compacted caches were compared byte for byte, keys with a near-copy).

    Each path must match the reference up to cut-off ties (dot products are summed in another
    order, so the redundancy of a key can differ in the last bits): two paths wrong alike fail."""
    params = reference.ScoringParams(budget=budget, window=WINDOW)
    compared = identical = same_caches = n_near = 0
    for round_ in range(rounds):
        if round_:
            greedy(fused, fused.kv_config.buffer)
        portable.load_state(fused.save_state())
        inputs, kept_fused = compress_and_collect(fused)
        _, kept_portable = compress_and_collect(portable)
        prof_fused, prof_portable = _native.profile(fused._ctx.ctx), _native.profile(portable._ctx.ctx)
        assert _native.REDUNDANCY_PATHS[prof_fused.redundancy_path] == FUSED_PATH
        assert _native.REDUNDANCY_PATHS[prof_portable.redundancy_path] == "portable"
        assert (prof_fused.fused_moves, prof_portable.fused_moves) == (int(FUSED_PATH == "cpu"), 0)
        same_kept = all(np.array_equal(a, b) for la, lb in zip(kept_fused, kept_portable) for a, b in zip(la, lb))
        if same_kept:
            # the same rows kept: the K/V moves (in place on the CPU, get_rows/set_rows in the graph)
            # must leave byte-identical caches
            assert fused.save_state().llama_state == portable.save_state().llama_state, round_
            same_caches += 1
        for layer, (q, k, scale) in enumerate(inputs):
            n_near += near_copies(k, params.threshold)
            for name, kept in (("fused", kept_fused[layer]), ("portable", kept_portable[layer])):
                assert reference.kept_sets_equivalent("rkv", q, k, scale, params, kept), (name, round_, layer)
            for a, b in zip(kept_fused[layer], kept_portable[layer]):
                compared += 1
                identical += int(np.array_equal(a, b))
    return compared, identical, same_caches, n_near


RKV_CASES = [c[:-1] for c in CASES if c[-1] == "rkv"]


@pytest.mark.parametrize("arch,n_head,n_head_kv,head_dim,type_kv,flash_attn", RKV_CASES)
def test_fused_equals_portable_on_the_same_cache(tiny_model, monkeypatch, arch, n_head, n_head_kv, head_dim,
                                                 type_kv, flash_attn):
    path = tiny_model(arch=arch, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim)
    kw = dict(type_kv=type_kv, flash_attn=flash_attn, monkeypatch=monkeypatch)
    fused = make(path, kernels="auto", **kw)
    portable = make(path, kernels="portable", **kw)
    fused.eval(random_tokens(BUDGET + BUFFER, seed=1))
    compared, identical, same_caches, _ = compare_paths(fused, portable, BUDGET, rounds=4)
    assert identical >= 0.9 * compared, (identical, compared)
    assert same_caches >= 2


def test_fused_equals_portable_on_smollm2(smollm2_path, monkeypatch):
    """Real keys: many near-copies, so the scan stops early; n = 160 spans ten tiles."""
    budget, buffer = 128, 32
    fused = make(smollm2_path, kernels="auto", monkeypatch=monkeypatch, budget=budget, buffer=buffer)
    portable = make(smollm2_path, kernels="portable", monkeypatch=monkeypatch, budget=budget, buffer=buffer)
    prompt = fused.tokenize(b"Write a long story about a robot who learns to paint. " * 20)
    fused.eval(prompt[: budget + buffer])
    compared, identical, _, n_near = compare_paths(fused, portable, budget, rounds=2)
    assert identical >= 0.9 * compared, (identical, compared)
    assert n_near > 0   # real keys repeat: the redundancy rule had near-copies to spare


def test_near_copy_scan_edge_cases(tiny_model, monkeypatch):
    """Keys equal to each other (every earlier key a near-copy) and a key with none: the tiles'
    boundaries, the partial oldest tile and the self-exclusion are covered by the engine cases;
    here one token repeated makes every key's newest near-copy its direct successor or predecessor."""
    path = tiny_model(arch="llama", n_head=4, n_head_kv=2, head_dim=32)
    fused = make(path, kernels="auto", monkeypatch=monkeypatch)
    portable = make(path, kernels="portable", monkeypatch=monkeypatch)
    fused.eval([1234] * (BUDGET + BUFFER // 2) + random_tokens(BUFFER // 2, seed=4))
    compared, identical, _, n_near = compare_paths(fused, portable, BUDGET, rounds=2)
    assert identical >= 0.9 * compared, (identical, compared)
    assert n_near > BUDGET   # the planted repeats are near-copies of each other


@pytest.mark.skipif(os.environ.get("RKV_TEST_CUDA_FAIL") != "malloc" or N_GPU_LAYERS == 0,
                    reason="scripts/gpu_check.sh forces a CUDA failure (RKV_TEST_CUDA_FAIL=malloc) on a GPU")
def test_a_forced_cuda_failure_falls_back_to_the_host_scan(tiny_model, monkeypatch):
    """The kernel's scratch allocation fails: the host scan gives the reference's selection, and the
    error is cleared, so ggml's next kernels (the decode after it) do not abort on it."""
    path = tiny_model(arch="llama", n_head=4, n_head_kv=2, head_dim=32)
    llm = make(path, kernels="auto", monkeypatch=monkeypatch)
    llm.eval(random_tokens(BUDGET + BUFFER, seed=6))
    params = reference.ScoringParams(budget=BUDGET, window=WINDOW)
    inputs, kept = compress_and_collect(llm)
    assert _native.REDUNDANCY_PATHS[_native.profile(llm._ctx.ctx).redundancy_path] == "host"
    for (q, k, scale), layer_kept in zip(inputs, kept):
        assert reference.kept_sets_equivalent("rkv", q, k, scale, params, layer_kept)
    greedy(llm, 2 * BUFFER)
    assert llm.kv_stats().compressions >= 2


def test_profile_reports_phases(tiny_model):
    llm = Llama(str(tiny_model(arch="llama")), kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW,
                n_threads=2, n_gpu_layers=N_GPU_LAYERS, verbose=False)
    llm.eval(random_tokens(BUDGET + BUFFER + 1, seed=2))
    prof = _native.profile(llm._ctx.ctx)
    assert prof.n_compressions == 1
    phases = [prof.build_seconds, prof.importance_seconds, prof.redundancy_seconds, prof.host_seconds,
              prof.compaction_seconds]
    assert all(p > 0 for p in phases)
    assert sum(phases) <= prof.total_seconds * 1.001
    assert prof.total_seconds <= llm.kv_stats().compress_seconds * 1.001


def test_kernels_setting_is_checked(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="unknown kernels"):
        _native.CompressionConfig(budget=64, kernels="fast")
    monkeypatch.setenv(_native.KERNELS_ENV, "nope")
    with pytest.raises(ValueError, match="RKV_KERNELS"):
        _native.CompressionConfig(budget=64)
    monkeypatch.delenv(_native.KERNELS_ENV)
    llm = Llama(str(tiny_model(arch="llama")), n_ctx=256, n_batch=64, n_ubatch=64, verbose=False)
    params = _native.CompressionConfig(budget=100, buffer=64).to_struct()
    params.kernels = 7
    assert _native.lib().rkv_enable(llm._ctx.ctx, params) == -1
    assert b"unknown kernels" in _native.lib().rkv_last_error()


def _ggml_include() -> list[str]:
    cache = Path(os.environ.get("RKV_LOCAL_CACHE", Path.home() / ".cache" / "rkv-local"))
    trees = sorted(cache.glob("llama.cpp-*/ggml/include"))
    return ["-I", str(trees[-1])] if trees else []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernel_compiles(tmp_path):
    """A -DGGML_CUDA=ON build of ggml takes far too long on a small CPU: compile just our kernel."""
    cmd = ["nvcc", "-c", "-std=c++17", "-O3", "-DRKV_HAVE_CUDA", "-arch=sm_90", "-Xcompiler", "-Wall",
           "-I", str(ROOT / "native"), *_ggml_include(), str(ROOT / "native" / "rkv-cuda.cu"),
           "-o", str(tmp_path / "rkv-cuda.o")]
    # not nvcc's business: a sanitizer runtime preloaded for this process (make test-asan)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "rkv-cuda.o").stat().st_size > 0
    symbols = subprocess.run(["nm", str(tmp_path / "rkv-cuda.o")], capture_output=True, text=True)
    if symbols.returncode == 0:
        assert " T rkv_cuda_near_copy" in symbols.stdout
