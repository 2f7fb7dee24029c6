// The newest near-copy of each key on a CUDA device (see rkv-fused.h for the contract).
//
// A block holds ROWS keys of one head in shared memory and walks tiles of TILE keys from the
// newest down: each warp owns ROWS/WARPS rows and each lane one key of the tile, so a row's
// hits in a tile are one ballot and its newest hit the highest set bit. The block stops at the
// first tile after which all its rows have a hit. Only O(n) results leave the device.
#include "rkv-fused.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

constexpr int RKV_CU_TILE  = 32; // keys per tile: one per lane
constexpr int RKV_CU_WARPS = 8;
constexpr int RKV_CU_ROWS  = 32; // rows per block, ROWS/WARPS per warp

__global__ void rkv_near_copy_kernel(const char * __restrict__ kn, size_t nb1, size_t nb2, int d, int n, float threshold,
                                     int * __restrict__ last, float * __restrict__ sim) {
    extern __shared__ float smem[];
    const int stride = d + 1; // padding: lanes read different keys without bank conflicts
    float * rows = smem;                          // [ROWS][d + 1]
    float * keys = smem + RKV_CU_ROWS*stride;     // [TILE][d + 1]

    const int h    = blockIdx.y;
    const int i0   = blockIdx.x*RKV_CU_ROWS;
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const char * head = kn + (size_t) h*nb2;

    for (int e = threadIdx.x; e < RKV_CU_ROWS*d; e += blockDim.x) {
        const int r = e / d, c = e % d;
        rows[r*stride + c] = i0 + r < n ? ((const float *) (head + (size_t) (i0 + r)*nb1))[c] : 0.0f;
    }

    constexpr int PER_WARP = RKV_CU_ROWS/RKV_CU_WARPS;
    int   best_j[PER_WARP];
    float best_s[PER_WARP];
    for (int m = 0; m < PER_WARP; ++m) {
        best_j[m] = -1;
        best_s[m] = 0.0f;
    }

    for (int hi = n; hi > 0; hi -= RKV_CU_TILE) {
        const int base = max(0, hi - RKV_CU_TILE);
        const int w = hi - base;
        __syncthreads(); // the previous tile is consumed (and the rows are loaded)
        for (int e = threadIdx.x; e < RKV_CU_TILE*d; e += blockDim.x) {
            const int t = e / d, c = e % d;
            keys[t*stride + c] = t < w ? ((const float *) (head + (size_t) (base + t)*nb1))[c] : 0.0f;
        }
        __syncthreads();

        bool pending = false;
        for (int m = 0; m < PER_WARP; ++m) {
            const int r = warp*PER_WARP + m;
            if (best_j[m] >= 0 || i0 + r >= n) {
                continue; // warp-uniform
            }
            float acc = 0.0f;
            for (int c = 0; c < d; ++c) {
                acc += rows[r*stride + c]*keys[lane*stride + c];
            }
            const int j = base + lane;
            const bool hit = lane < w && j != i0 + r && acc > threshold;
            const unsigned mask = __ballot_sync(0xffffffffu, hit);
            if (mask) {
                const int src = 31 - __clz(mask);
                best_j[m] = base + src;
                best_s[m] = __shfl_sync(0xffffffffu, acc, src);
            } else {
                pending = true;
            }
        }
        // all rows of the block have their newest near-copy: older tiles cannot change it
        if (!__syncthreads_or(pending)) {
            break;
        }
    }

    if (lane == 0) {
        for (int m = 0; m < PER_WARP; ++m) {
            const int i = i0 + warp*PER_WARP + m;
            if (i < n) {
                last[(size_t) h*n + i] = best_j[m];
                sim[(size_t) h*n + i]  = best_s[m];
            }
        }
    }
}

// results land here before the copy back; grown as needed, one per device
std::mutex g_mutex;
std::vector<std::pair<void *, size_t>> g_scratch;

// A failed call leaves its error to the next cudaGetLastError: ggml checks that after its own
// kernels, and would abort on ours. Cleared here; the caller falls back to the host scan.
bool rkv_cuda_ok(cudaError_t err, const char * what) {
    if (err != cudaSuccess) {
        fprintf(stderr, "rkv-local: %s failed: %s\n", what, cudaGetErrorString(err));
        cudaGetLastError();
        return false;
    }
    return true;
}

// RKV_TEST_CUDA_FAIL=malloc makes the scratch allocation ask for too much: a real failure, for the
// test of the fallback (scripts/gpu_check.sh)
bool rkv_cuda_forced_failure() {
    const char * what = getenv("RKV_TEST_CUDA_FAIL");
    return what && strcmp(what, "malloc") == 0;
}

} // namespace

extern "C" bool rkv_cuda_near_copy(const void * kn, size_t nb1, size_t nb2, int64_t d, int64_t n, int64_t n_head,
                                   float threshold, int32_t * last, float * sim) {
    if (n <= 0 || n_head <= 0 || d <= 0 || d > 1024 || n > (1ll << 30)) {
        return false;
    }
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, kn) != cudaSuccess ||
        (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
        cudaGetLastError(); // clear the error of a host pointer
        return false;
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    int prev = 0;
    if (!rkv_cuda_ok(cudaGetDevice(&prev), "cudaGetDevice") || !rkv_cuda_ok(cudaSetDevice(attr.device), "cudaSetDevice")) {
        return false;
    }
    if ((int) g_scratch.size() <= attr.device) {
        g_scratch.resize(attr.device + 1, { nullptr, 0 });
    }
    auto & scratch = g_scratch[attr.device];
    const size_t bytes = rkv_cuda_forced_failure() ? (size_t) 1 << 60 : (size_t) (n*n_head)*(sizeof(int32_t) + sizeof(float));
    bool ok = true;
    if (scratch.second < bytes) {
        if (scratch.first) {
            rkv_cuda_ok(cudaFree(scratch.first), "cudaFree");
        }
        scratch = { nullptr, 0 };
        ok = rkv_cuda_ok(cudaMalloc(&scratch.first, bytes), "cudaMalloc");
        if (ok) {
            scratch.second = bytes;
        }
    }
    if (ok) {
        int   * d_last = (int *) scratch.first;
        float * d_sim  = (float *) (d_last + n*n_head);
        const size_t smem = (size_t) (RKV_CU_ROWS + RKV_CU_TILE)*(d + 1)*sizeof(float);
        if (smem > 160*1024) {
            ok = false; // very wide heads: the host scan takes them (the caller says so once)
        } else if (smem > 48*1024) {
            ok = rkv_cuda_ok(cudaFuncSetAttribute(rkv_near_copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int) smem),
                             "cudaFuncSetAttribute");
        }
        if (ok) {
            const dim3 grid((unsigned) ((n + RKV_CU_ROWS - 1)/RKV_CU_ROWS), (unsigned) n_head);
            rkv_near_copy_kernel<<<grid, RKV_CU_WARPS*32, smem>>>((const char *) kn, nb1, nb2, (int) d, (int) n, threshold,
                                                                  d_last, d_sim);
            ok = rkv_cuda_ok(cudaGetLastError(), "the near-copy kernel launch") &&
                 rkv_cuda_ok(cudaMemcpy(last, d_last, (size_t) (n*n_head)*sizeof(int32_t), cudaMemcpyDeviceToHost), "cudaMemcpy") &&
                 rkv_cuda_ok(cudaMemcpy(sim, d_sim, (size_t) (n*n_head)*sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
        }
    }
    rkv_cuda_ok(cudaSetDevice(prev), "cudaSetDevice");
    return ok;
}
