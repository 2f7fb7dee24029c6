#!/usr/bin/env bash
# GPU check of the engine and its fused scoring: builds rkv-local with CUDA (sm_90) into build-cuda/,
# runs the engine tests with the KV cache on the GPU (n_gpu_layers = -1, the fused path is then the
# CUDA kernel of native/rkv-cuda.cu), the portable graph on the GPU, and the compression benchmark.
# Sized for one H200 (16 cores): under 8 minutes, most of it the CUDA build of ggml.
#
#   scripts/gpu_check.sh                 # from anywhere; JOBS=n to change the build's parallelism
#   RKV_GPU_CHECK_CMAKE_ARGS="-DGGML_CUDA_FA=OFF" scripts/gpu_check.sh   # a faster build, no CUDA flash attention
#
# Needs: .venv (`make venv`), nvcc, a CUDA GPU, and in ~/.cache/rkv-local (or $RKV_LOCAL_CACHE) the
# pinned llama-cpp-python sdist and the models SmolLM2-135M and Qwen2.5-Coder-0.5B (`make test` and
# `rkv_local.models.fetch("qwen2.5-coder-0.5b")` put them there); nothing is downloaded when they are.
# The CPU build in build/ and rkv_local/lib are left alone: the tests load build-cuda/install/lib
# through RKV_LOCAL_LIB_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
BUILD=$ROOT/build-cuda
JOBS=${JOBS:-$(nproc)}
CACHE=${RKV_LOCAL_CACHE:-$HOME/.cache/rkv-local}
START=$(date +%s)
step() { printf '\n== %s  [%ds]\n' "$1" $(( $(date +%s) - START )); }

[ -x "$BIN/python" ] || { echo "gpu_check: no .venv here; run 'make venv' first" >&2; exit 2; }
command -v nvcc >/dev/null || { echo "gpu_check: nvcc not found (add the CUDA toolkit's bin to PATH)" >&2; exit 2; }
nvidia-smi -L || { echo "gpu_check: no CUDA GPU visible" >&2; exit 2; }
for model in SmolLM2-135M-Instruct.Q4_1.gguf Qwen2.5-Coder-0.5B-Instruct.gguf; do
    [ -f "$CACHE/models/$model" ] || echo "gpu_check: warning: $CACHE/models/$model is missing; the tests will try to download it" >&2
done

step "configure and build with CUDA (sm_90) into $BUILD"
# shellcheck disable=SC2086  # the extra switches are meant to split
"$BIN/cmake" -S . -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$BIN/ninja" -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$BIN/python" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DRKV_LIB_DESTINATION=lib ${RKV_GPU_CHECK_CMAKE_ARGS:-}
"$BIN/cmake" --build "$BUILD" -j "$JOBS"
"$BIN/cmake" --install "$BUILD" --prefix "$BUILD/install" >/dev/null
export RKV_LOCAL_LIB_DIR=$BUILD/install/lib
grep -q '"ggml_cuda": true' "$RKV_LOCAL_LIB_DIR/build-info.json" || { echo "gpu_check: the build has no CUDA" >&2; exit 1; }

step "engine tests with the cache on the GPU (fused path: the CUDA kernel)"
RKV_TEST_N_GPU_LAYERS=-1 PYTHONPATH=tests "$BIN/python" -m pytest -q -p gpu_offload \
    tests/test_fused.py tests/test_engine.py tests/test_iswa.py -k "not batch"

step "engine selection tests with the cache on the GPU, portable graph"
RKV_KERNELS=portable RKV_TEST_N_GPU_LAYERS=-1 PYTHONPATH=tests "$BIN/python" -m pytest -q -p gpu_offload \
    tests/test_engine.py -k "selection_equals_reference or logits_after_compaction"

step "compression benchmark, Qwen2.5-Coder-0.5B on the GPU"
"$BIN/python" scripts/bench_compression.py --model qwen2.5-coder-0.5b --budget 1024 --buffer 128 \
    --n-gpu-layers -1 --compressions 3 --json "$BUILD/bench-qwen-gpu.json"

step "throughput at a fixed KV memory, Qwen2.5-Coder-0.5B on the GPU (issue 13): full vs rkv@1024, 4K-token traces"
"$BIN/python" -m rkv_local bench qwen2.5-coder-0.5b --parallel --budgets 1024 --lengths 4k --prompt-tokens 256 \
    --kv-memory $((64 * 1152 * 12288)) --n-gpu-layers -1 --threads 4 --out "$BUILD/throughput-qwen-gpu"

step "done"
