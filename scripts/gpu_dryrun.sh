#!/usr/bin/env bash
# The GPU check's dry run on this machine (`make gpu-dryrun`): scripts/gpu_check.sh from a fresh clone
# of this repository plus .gpu/ only, in a network namespace without network (unshare -n, as root),
# with HOME and RKV_LOCAL_CACHE empty and python3 a fresh venv holding exactly what the GPU machine's
# python3 has (numpy, pytest, jinja2, tqdm, cmake, ninja, scikit-build-core): any download, and any
# file of this machine's caches, fails it. No GPU here: the check takes its CPU path.
#
#   scripts/gpu_dryrun.sh [OUT]     # default: gpu-results/dryrun; packs .gpu/ first if it is missing
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=$(mkdir -p "${1:-gpu-results/dryrun}" && cd "${1:-gpu-results/dryrun}" && pwd)
DRY=${RKV_DRYRUN_DIR:-/tmp/rkv-gpu-dryrun}
command -v unshare >/dev/null || { echo "gpu_dryrun: unshare (util-linux) is needed" >&2; exit 2; }
[ -d .gpu ] || scripts/gpu_pack.sh

rm -rf "$DRY" && mkdir -p "$DRY/home" "$DRY/cache"
git clone -q "$ROOT" "$DRY/repo"
cp -r .gpu "$DRY/repo/.gpu"
python3 -m venv "$DRY/venv"
"$DRY/venv/bin/python" -m pip install -q numpy pytest jinja2 tqdm cmake ninja scikit-build-core

start=$(date +%s)
unshare -n env -i PATH="$DRY/venv/bin:/usr/local/bin:/usr/bin:/bin" HOME="$DRY/home" \
    RKV_LOCAL_CACHE="$DRY/cache" LANG=C.UTF-8 JOBS="${JOBS:-$(nproc)}" \
    bash "$DRY/repo/scripts/gpu_check.sh" "$OUT"
echo "gpu_dryrun: $(( $(date +%s) - start )) s; results in $OUT:"
ls -la "$OUT"
# the throughput step took the GPU's sizing path (free memory after the weights, here the host's)
grep -q '^KV memory .* the free memory after the weights' "$OUT/summary.md" \
    || { echo "gpu_dryrun: the throughput step did not size its KV memory (see $OUT/summary.md)" >&2; exit 1; }
