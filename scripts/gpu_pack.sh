#!/usr/bin/env bash
# Packs what the offline GPU machine lacks into .gpu/ (git-ignored, at most 48 MiB), for
# scripts/gpu_check.sh to build and measure there with no network:
#
#   .gpu/llama.cpp.tar.xz   the patched llama.cpp tree (this build's patches), pruned to what a CUDA
#                           build of libllama needs
#   .gpu/site/              pure-Python packages: llama-cpp-python 0.3.36's bindings (no compiled
#                           library), gguf, and what they import that the machine lacks (diskcache,
#                           PyYAML's pure part)
#   .gpu/vocab-smollm2.gguf SmolLM2's tokenizer alone, the vocabulary of the random models made there
#   .gpu/PACKED             what was packed, from which commit
#
#   scripts/gpu_pack.sh      # here, with the network; after `make build` (it reuses the patched tree)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
OUT=$ROOT/.gpu
LIMIT_MIB=48

[ -x "$BIN/python" ] || { echo "gpu_pack: no .venv here; run 'make build' first" >&2; exit 2; }
[ -f build/CMakeCache.txt ] || { echo "gpu_pack: no build/ here; run 'make build' first" >&2; exit 2; }
# the configuration names the patched tree it builds from (a second configure takes seconds)
TREE=$("$BIN/cmake" -S . -B build 2>/dev/null | sed -n 's/^-- rkv-local: llama.cpp source: //p' | tail -1)
[ -f "$TREE/.rkv-ready" ] || { echo "gpu_pack: no patched llama.cpp tree found (run 'make build')" >&2; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT/site"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# the tree: the library, ggml's base, CPU and CUDA backends and their build files; no tools, tests,
# models, other backends or documentation
TOP=$(basename "$TREE")
XZ_OPT="${XZ_OPT:--6 -T0}" tar -C "$(dirname "$TREE")" -cJf "$OUT/llama.cpp.tar.xz" \
    --exclude='*/ggml/src/ggml-vulkan' --exclude='*/ggml/src/ggml-metal' --exclude='*/ggml/src/ggml-sycl' \
    --exclude='*/ggml/src/ggml-opencl' --exclude='*/ggml/src/ggml-cann' --exclude='*/ggml/src/ggml-musa' \
    --exclude='*/ggml/src/ggml-hip' --exclude='*/ggml/src/ggml-webgpu' --exclude='*/ggml/src/ggml-zdnn' \
    --exclude='*/ggml/src/ggml-hexagon' --exclude='*/ggml/src/ggml-zendnn' --exclude='*/ggml/src/ggml-virtgpu' \
    --exclude='*/ggml/src/ggml-kompute' --exclude='*/ggml/src/ggml-openvino' --exclude='*/ggml/src/ggml-et' --exclude='*/ggml/src/ggml-rpc' --exclude='*/ggml/src/ggml-blas' \
    --exclude="$TOP/models" --exclude="$TOP/tests" --exclude="$TOP/examples" --exclude="$TOP/tools" --exclude="$TOP/docs" \
    --exclude="$TOP/gguf-py" --exclude="$TOP/scripts" --exclude="$TOP/media" --exclude="$TOP/grammars" --exclude="$TOP/prompts" \
    --exclude="$TOP/pocs" --exclude="$TOP/.github" --exclude="$TOP/.devops" --exclude="$TOP/benches" --exclude="$TOP/requirements" \
    --exclude='*.gguf' --exclude='*/.git' \
    "$(basename "$TREE")"

# llama-cpp-python's Python sources, from the sdist the build verified
SDIST=${RKV_LOCAL_CACHE:-$HOME/.cache/rkv-local}/sdist/llama_cpp_python-0.3.36.tar.gz
[ -f "$SDIST" ] || { echo "gpu_pack: $SDIST is missing (run 'make build')" >&2; exit 2; }
tar -C "$WORK" -xzf "$SDIST" llama_cpp_python-0.3.36/llama_cpp
cp -r "$WORK/llama_cpp_python-0.3.36/llama_cpp" "$OUT/site/llama_cpp"

# pure-Python wheels of what the check imports beyond the machine's list (numpy, pytest, jinja2, tqdm)
GGUF_VERSION=$("$BIN/python" -c 'import importlib.metadata as m; print(m.version("gguf"))')
"$BIN/python" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheels" \
    "gguf==$GGUF_VERSION" "diskcache" "typing_extensions"
"$BIN/python" -m pip download -q --no-deps --no-binary=:all: -d "$WORK/sdists" "PyYAML"
for wheel in "$WORK"/wheels/*.whl; do
    "$BIN/python" -m zipfile -e "$wheel" "$OUT/site"
done
tar -C "$WORK" -xzf "$WORK"/sdists/[Pp]y[Yy][Aa][Mm][Ll]-*.tar.gz
cp -r "$WORK"/[Pp]y[Yy][Aa][Mm][Ll]-*/lib/yaml "$OUT/site/yaml"   # pure Python (no libyaml)
rm -rf "$OUT"/site/*.dist-info "$OUT"/site/gguf/scripts
find "$OUT/site" \( -name '__pycache__' -o -name '*.so' \) -prune -exec rm -rf {} +

# SmolLM2's tokenizer: every tokenizer.* key, no tensor
"$BIN/python" - "$OUT/vocab-smollm2.gguf" <<'EOF'
import sys
from gguf import GGUFWriter
from rkv_local.models import fetch
from rkv_local.testing import _tokenizer_metadata

writer = GGUFWriter(sys.argv[1], "llama")
for entry in _tokenizer_metadata(fetch("smollm2-135m")):
    writer.add_key_value(entry.key, entry.value, entry.value_type, entry.item_type)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
EOF

{
    echo "packed $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "llama.cpp tree: $(basename "$TREE") (patch set $(cat "$TREE/.rkv-ready"))"
    echo "python: llama_cpp 0.3.36 $(ls "$OUT/site" | tr '\n' ' ')"
} > "$OUT/PACKED"

SIZE=$(du -sb "$OUT" | cut -f1)
echo "gpu_pack: $OUT holds $((SIZE / 1024)) KiB:"
du -sh "$OUT"/* | sed 's/^/  /'
if [ "$SIZE" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "gpu_pack: .gpu/ is over ${LIMIT_MIB} MiB: the GPU machine takes 64 MiB of working tree in all" >&2
    exit 1
fi
