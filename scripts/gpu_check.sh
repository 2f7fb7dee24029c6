#!/usr/bin/env bash
# The GPU check, offline: builds rkv-local with CUDA from the repository and .gpu/ (scripts/gpu_pack.sh),
# runs the engine tests with the KV cache on the GPU and measures compression and throughput on random
# models of real shapes made here. Nothing is downloaded; nothing outside the repository is read but
# the machine's python3 (numpy, pytest, jinja2, tqdm, cmake, ninja) and CUDA toolkit.
#
#   scripts/gpu_check.sh OUT        # or RKV_GPU_OUT=OUT; results (8 files at most) go to OUT
#
# Timing plan, one H100 (about 78 GiB) or H200 (about 139 GiB) and 16 cores: the estimates sum to 9
# minutes; each step has a time limit (the limits sum to 11, for a step that hangs) and appends its
# results to OUT as it ends, so a run cut off still returns what it finished:
#   0:00  unpack .gpu/, find cuBLAS, check the imports                         ~10 s
#   0:10  configure and build libllama with CUDA for sm_90 only (16 jobs)      ~3.5 min (limit 240 s)
#   3:40  engine tests, cache on the GPU, fused CUDA kernel (78 tests)         ~2 min   (limit 150 s)
#   5:40  the portable graph on the GPU; a forced CUDA failure                 ~35 s    (limits 40, 20 s)
#   6:15  random models of real shapes (f16, one draw shared by the layers): Qwen2.5-0.5B (24 x 14/2
#         heads of 64), R1-Distill-Llama-8B (32 x 32/8 heads of 128, hidden 4096, FFN 14336), SmolLM2's
#         vocabulary                                                            ~35 s    (limit 45 s)
#   6:50  compression benchmark on both shapes, B = 1024, b = 128              ~55 s    (limits 30, 45 s)
#   7:45  the paper's throughput table on the 8B shape: full cache at 16K tokens against rkv at
#         1024 + 128 and the limit, 128 steady decode steps, in the KV memory the GPU has free after the
#         weights (~14 GiB) less a reserve for compute buffers (4 GiB + 5%), at most 64 GiB (about the
#         paper's A100 80 GB): ~58 GiB on an H100 (28 full sequences), 64 on an H200 (31). More would
#         only add full sequences (rkv is at llama.cpp's 256 on both) and their prefill, the step's
#         longest part; the H100's fewer full sequences save about the time its slower memory (3.35
#         against 4.8 TB/s) costs in the decode steps                          ~1.5 min (limit 100 s)
#
# Without a GPU (nvidia-smi finds none: `make gpu-dryrun` here) the same steps run on the CPU, with a
# CPU build, the tests without offload, and the shapes and sizes scaled down (said in the summary).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${1:-${RKV_GPU_OUT:-}}
[ -n "$OUT" ] || { echo "usage: scripts/gpu_check.sh OUT   (or RKV_GPU_OUT=OUT)" >&2; exit 2; }
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
BUILD=$ROOT/build-gpu
WORK=$BUILD/work
SUMMARY=$OUT/summary.md
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
START=$(date +%s)
mkdir -p "$WORK"
: > "$RESULTS"
: > "$LOG"

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
# record NAME STATUS SECONDS [JSON]: one line of results.jsonl and of the summary
record() {
    local extra=${4:-"{}"}
    printf '{"step": "%s", "status": "%s", "seconds": %s, "at": %s, "details": %s}\n' "$1" "$2" "$3" "$(elapsed)" "$extra" >> "$RESULTS"
    note "- **$1**: $2 in $3 s"
}
# run NAME LIMIT command...: the command under a time limit, its output in the log (and its tail in
# the summary when it fails)
run() {
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo "== $name (limit ${limit} s, at $(elapsed) s)" >> "$LOG"
    # through bash: a step may be one of the functions below (exported); timeout stops its children too
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >> "$LOG" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    local status=ok
    [ $rc -eq 0 ] || status="failed (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
    record "$name" "$status" "$took"
    if [ $rc -ne 0 ]; then
        { echo '```'; tail -n 25 "$LOG"; echo '```'; } >> "$SUMMARY"
    fi
    return $rc
}

[ -f .gpu/llama.cpp.tar.xz ] || { echo "gpu_check: .gpu/ is missing: run scripts/gpu_pack.sh where the network is" >&2; exit 2; }
if nvidia-smi -L > "$WORK/gpus.txt" 2>/dev/null && grep -q '^GPU' "$WORK/gpus.txt"; then
    GPU=1
    DEVICE=$(head -1 "$WORK/gpus.txt")
else
    GPU=0
    DEVICE="no GPU: CPU dry run ($(nproc) cores)"
fi
{
    echo "# rkv-local GPU check"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || cat .gpu/PACKED | head -1)"
    echo "device: $DEVICE; $(cat .gpu/PACKED | head -1)"
    echo
} > "$SUMMARY"

# -- unpack, python, cuBLAS --------------------------------------------------------------------
t0=$(date +%s)
tar -C "$WORK" -xJf .gpu/llama.cpp.tar.xz
TREE=$(ls -d "$WORK"/llama.cpp-*/ | head -1)
export PYTHONPATH=$ROOT/.gpu/site:$ROOT:$ROOT/tests
export RKV_TEST_VOCAB=$ROOT/.gpu/vocab-smollm2.gguf
export RKV_LOCAL_LIB_DIR=$BUILD/install/lib
CMAKE_EXTRA=()
if [ $GPU = 1 ]; then
    # cuBLAS where the toolkit keeps it, or in the NVIDIA pip packages (nvidia/cublas/{include,lib})
    SITE_NVIDIA=$("$PY" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
    CUBLAS_LIB=""
    for dir in "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
               "$SITE_NVIDIA/cublas/lib"; do
        lib=$(ls "$dir"/libcublas.so* 2>/dev/null | head -1)
        if [ -n "$lib" ]; then CUBLAS_LIB=$lib; break; fi
    done
    if [ -n "$SITE_NVIDIA" ]; then
        for lib in "$SITE_NVIDIA"/*/lib; do LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-}; done
        for inc in "$SITE_NVIDIA"/*/include; do CPATH=$inc:${CPATH:-}; done
        export LD_LIBRARY_PATH CPATH
    fi
    if [ -n "$CUBLAS_LIB" ]; then
        LT=$(ls "$(dirname "$CUBLAS_LIB")"/libcublasLt.so* 2>/dev/null | head -1)
        CMAKE_EXTRA+=(-DCUDA_cublas_LIBRARY="$CUBLAS_LIB" ${LT:+-DCUDA_cublasLt_LIBRARY="$LT"})
    fi
    CMAKE_EXTRA+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
    note "cuBLAS: ${CUBLAS_LIB:-from the toolkit}; nvcc: $(command -v nvcc || echo 'not on PATH')"
fi
"$PY" -c "import numpy, pytest, jinja2, tqdm, gguf, yaml, diskcache" >> "$LOG" 2>&1 \
    || { record "unpack" "failed: a Python import (see log.txt)" $(( $(date +%s) - t0 )); exit 1; }
record "unpack" ok $(( $(date +%s) - t0 ))

# -- build ----------------------------------------------------------------------------------------
build() {
    # shellcheck disable=SC2086  # the extra switches split on spaces
    cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(command -v "$PY")" \
        -DRKV_LLAMA_SOURCE="$TREE" -DRKV_RPC=OFF -DRKV_LIB_DESTINATION=lib $CMAKE_EXTRA_ARGS \
        && cmake --build "$BUILD" -j "$JOBS" && cmake --install "$BUILD" --prefix "$BUILD/install"
}
CMAKE_EXTRA_ARGS="${CMAKE_EXTRA[*]}"
export ROOT BUILD PY TREE JOBS OUT WORK CMAKE_EXTRA_ARGS
export -f build
run "build ($([ $GPU = 1 ] && echo 'CUDA sm_90' || echo CPU))" "$([ $GPU = 1 ] && echo 240 || echo 600)" build || exit 1
if [ $GPU = 1 ] && ! grep -q '"ggml_cuda": true' "$RKV_LOCAL_LIB_DIR/build-info.json"; then
    note "the build has no CUDA"; exit 1
fi

# -- engine tests -------------------------------------------------------------------------------
TESTS=(tests/test_engine.py tests/test_fused.py tests/test_iswa.py tests/test_automatic_compressions.py
       tests/test_kept_prompt.py tests/test_query_capture.py tests/test_triattention.py
       tests/test_batched.py::test_8_sequences_of_a_tiny_model_equal_alone)
pytest_run() {   # pytest_run XML [args...]
    local xml=$1; shift
    "$PY" -m pytest -q -p no:cacheprovider -p gpu_offload --junitxml="$OUT/$xml" "$@"
}
export -f pytest_run
tally() {   # the counts of a junit file, as JSON
    "$PY" - "$OUT/$1" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
print(json.dumps({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}))
EOF
}
OFFLOAD=$([ $GPU = 1 ] && echo -1 || echo "")
TEST_LIMIT=$([ $GPU = 1 ] && echo 150 || echo 900)   # a CPU dry run has no 9 minutes to keep
RKV_TEST_N_GPU_LAYERS=$OFFLOAD run "engine tests, cache on the $([ $GPU = 1 ] && echo 'GPU (fused: the CUDA kernel)' || echo 'CPU')" "$TEST_LIMIT" \
    pytest_run tests-fused.xml "${TESTS[@]}" -k "not compiles"
note "  $(tally tests-fused.xml 2>/dev/null)"
RKV_KERNELS=portable RKV_TEST_N_GPU_LAYERS=$OFFLOAD run "engine tests, portable graph" "$([ $GPU = 1 ] && echo 40 || echo 300)" \
    pytest_run tests-portable.xml tests/test_engine.py -k "selection or logits or real_model"
note "  $(tally tests-portable.xml 2>/dev/null)"
if [ $GPU = 1 ]; then
    RKV_TEST_CUDA_FAIL=malloc RKV_TEST_N_GPU_LAYERS=-1 run "a forced CUDA failure: the host scan takes over" 20 \
        "$PY" -m pytest -q -p no:cacheprovider -p gpu_offload tests/test_fused.py -k "forced_cuda_failure"
fi

# -- random models of real shapes ----------------------------------------------------------------
if [ $GPU = 1 ]; then
    QWEN_SHAPE="dict(arch='qwen2', n_layer=24, n_head=14, n_head_kv=2, head_dim=64, n_ff=4864)"
    R1_SHAPE="dict(arch='llama', n_layer=32, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336)"
    NGL=-1; THREADS=4
    BENCH_B=1024; BENCH_b=128
    TP_ARGS=(--kv-memory-gib auto --kv-memory-max-gib 64 --length 16384 --budget 1024 --buffer 128 --steps 128)
else
    # scaled for a CPU: the head layouts, fewer and narrower layers, smaller budgets
    QWEN_SHAPE="dict(arch='qwen2', n_layer=4, n_head=14, n_head_kv=2, head_dim=64, n_ff=1024)"
    R1_SHAPE="dict(arch='llama', n_layer=2, n_head=32, n_head_kv=8, head_dim=128, n_ff=1024)"
    NGL=0; THREADS=$(nproc)
    BENCH_B=256; BENCH_b=64
    # the same sizing from the host's available memory, capped to keep the step short
    TP_ARGS=(--kv-memory-gib auto --kv-memory-max-gib 0.1 --length 2048 --budget 128 --buffer 32 --steps 32)
    note "  (CPU: the shapes below are scaled down: $QWEN_SHAPE; $R1_SHAPE)"
fi
models() {
    "$PY" - "$WORK" "$QWEN_SHAPE" "$R1_SHAPE" "$RKV_TEST_VOCAB" <<'EOF'
import sys
from rkv_local.testing import make_tiny_model
work, qwen, r1, vocab = sys.argv[1:5]
for name, shape in (("qwen2.5-0.5b-shape", qwen), ("r1-llama-8b-shape", r1)):
    make_tiny_model(f"{work}/{name}.gguf", vocab_from=vocab, n_ctx_train=32768, shared_layers=True, **eval(shape))
    print(name, "written")
EOF
}
export QWEN_SHAPE R1_SHAPE
export -f models
run "random models of real shapes" "$([ $GPU = 1 ] && echo 45 || echo 120)" models

for shape in qwen2.5-0.5b-shape r1-llama-8b-shape; do
    limit=$([ $GPU = 0 ] && echo 120 || { [ $shape = r1-llama-8b-shape ] && echo 45 || echo 30; })
    run "compression benchmark, $shape" "$limit" "$PY" scripts/bench_compression.py --model "$WORK/$shape.gguf" \
        --budget $BENCH_B --buffer $BENCH_b --methods rkv/portable,rkv --compressions 2 \
        --n-gpu-layers $NGL --threads $THREADS --json "$WORK/compression-$shape.json"
    if [ -f "$WORK/compression-$shape.json" ]; then
        "$PY" scripts/gpu_report.py compression "$WORK/compression-$shape.json" "$shape" "$RESULTS" >> "$SUMMARY"
    fi
done

run "throughput at a fixed KV memory, r1-llama-8b-shape" "$([ $GPU = 1 ] && echo 100 || echo 300)" "$PY" scripts/bench_steady_throughput.py \
    --model "$WORK/r1-llama-8b-shape.gguf" "${TP_ARGS[@]}" --n-gpu-layers $NGL --threads $THREADS \
    --json "$WORK/throughput.json"
if [ -f "$WORK/throughput.json" ]; then
    "$PY" scripts/gpu_report.py throughput "$WORK/throughput.json" r1-llama-8b-shape "$RESULTS" >> "$SUMMARY"
fi
note ""
note "done in $(elapsed) s"
