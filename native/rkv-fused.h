// Fused kernels of a compression (rkv_params.kernels = RKV_KERNELS_AUTO).
//
// The newest near-copy of each key, without the n x n similarity matrix.
//
// For key i of a head: the largest j != i with cos(k_i, k_j) > threshold, and that cosine; none
// gives j = -1 and similarity 0. The keys are already L2-normalised, so a cosine is a dot product.
// Rows are scanned from the newest key down and stop at the first tile with a hit.
#pragma once

#include <cstddef>
#include <cstdint>

struct ggml_context;
struct ggml_tensor;

// Rows [i0, i1) of one head. kn: the head's normalised keys, key i at kn + i*d; knt: the same keys
// k-major, component c of key j at knt + c*n + j. Writes last[i - i0] (-1: none) and sim[i - i0].
void rkv_near_copy_rows(const float * kn, const float * knt, int64_t n, int64_t d, int64_t i0, int64_t i1,
                        float threshold, int32_t * last, float * sim);

// The fused CPU op: kn F32 [d, n, n_head_kv] contiguous -> F32 [n, n_head_kv, 3]: plane 0 the index of
// each key's newest near-copy (-1: none; exact in f32 for n < 2^24), plane 1 its similarity, plane 2
// the sum of its similarities to all other keys. Runs on all of the CPU backend's threads, each a share
// of the row blocks. `threshold` must outlive the graph.
ggml_tensor * rkv_build_near_copy_cpu(ggml_context * ctx, ggml_tensor * kn, const float * threshold);

// The same on the host for keys already read back (the fallback when a device kernel is unavailable):
// kn [n_head][n][d] contiguous; last and sim [n_head][n].
void rkv_near_copy_host(const float * kn, int64_t n, int64_t d, int64_t n_head, float threshold,
                        int32_t * last, float * sim);

// In-place moves of one layer's kept K/V rows on the CPU: head h's cells cells[h][0..budget) go, in
// order, to cells [0, budget) of the stream, for K and V alike, raw bytes (any type; quantized rows
// are block-aligned per head). All of the CPU backend's threads, a share of the heads (and of the
// channels of a transposed V) each.
struct rkv_compact_cpu_params {
    int64_t n_dst;        // cells moved per head, to [0, n_dst)
    int64_t n_head;
    size_t  k_head_bytes; // bytes of one head's part of a K row
    size_t  v_head_bytes; // V not transposed: the same for V
    int64_t v_head_dim;   // V transposed: channels per head
    bool    has_v;
    bool    v_trans;
};

// k: the stream's K, rows = cells ([row bytes, kv_size] view); v: its V the same way, or transposed
// ([kv_size, n_embd_v] view, rows = channels), or null; cells: I32 [n_dst, n_head]. Returns the node
// to expand (a dummy output; the moves are its side effect). `p` must outlive the graph.
ggml_tensor * rkv_build_compaction_cpu(ggml_context * ctx, ggml_tensor * k, ggml_tensor * v, ggml_tensor * cells,
                                       const rkv_compact_cpu_params * p);

#ifdef RKV_HAVE_CUDA
// native/rkv-cuda.cu: kn is device memory holding F32 [d, n, n_head] with byte strides nb1 (key) and
// nb2 (head); last and sim are host arrays [n_head][n]. False when kn is not device memory or a CUDA
// call failed: the caller then falls back to the host scan.
extern "C" bool rkv_cuda_near_copy(const void * kn, size_t nb1, size_t nb2, int64_t d, int64_t n, int64_t n_head,
                                   float threshold, int32_t * last, float * sim);
#endif
