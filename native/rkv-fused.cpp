// The newest near-copy of each key on the CPU: a ggml custom op over all of the backend's threads.
//
// A block of RKV_ROWS keys is compared with tiles of RKV_TILE keys, newest tile first. The tile is
// read k-major (the transposed keys), so each component is one vector load shared by every row of
// the block and the dot products of a row with the tile's keys accumulate in vector lanes, in the
// order of the components. A row is done at the first tile holding a hit (its newest hit is the
// newest there); the block stops when all its rows are done. Real keys find a near-copy within a
// few tiles, so most rows cost O(d * tile) instead of O(d * n).
#include "rkv-fused.h"

#include "ggml.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int RKV_ROWS = 4;  // rows scanned together
constexpr int RKV_TILE = 16; // keys per tile: one 512-bit vector of f32

// One build serves every x86-64 CPU: the loader picks the widest clone the CPU runs.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define RKV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RKV_CLONES
#endif

#if defined(__GNUC__)
typedef float rkv_v16 __attribute__((vector_size(RKV_TILE*sizeof(float))));
#endif

// Dot products of `rows` (RKV_ROWS pointers to d floats) with keys [base, base + RKV_TILE).
RKV_CLONES
void rkv_tile_full(const float * const * rows, const float * knt, int64_t n, int64_t d, int64_t base,
                   float acc[RKV_ROWS][RKV_TILE]) {
#if defined(__GNUC__)
    rkv_v16 a[RKV_ROWS];
    for (int r = 0; r < RKV_ROWS; ++r) {
        a[r] = rkv_v16{} ;
    }
    for (int64_t c = 0; c < d; ++c) {
        rkv_v16 kv;
        std::memcpy(&kv, knt + c*n + base, sizeof(kv));
        for (int r = 0; r < RKV_ROWS; ++r) {
            a[r] += rows[r][c]*kv;
        }
    }
    std::memcpy(acc, a, sizeof(a));
#else
    for (int r = 0; r < RKV_ROWS; ++r) {
        std::fill(acc[r], acc[r] + RKV_TILE, 0.0f);
    }
    for (int64_t c = 0; c < d; ++c) {
        const float * kv = knt + c*n + base;
        for (int r = 0; r < RKV_ROWS; ++r) {
            for (int t = 0; t < RKV_TILE; ++t) {
                acc[r][t] += rows[r][c]*kv[t];
            }
        }
    }
#endif
}

// The same for a partial tile: keys [base, base + w), w < RKV_TILE.
void rkv_tile_part(const float * const * rows, const float * knt, int64_t n, int64_t d, int64_t base, int w,
                   float acc[RKV_ROWS][RKV_TILE]) {
    for (int r = 0; r < RKV_ROWS; ++r) {
        std::fill(acc[r], acc[r] + RKV_TILE, 0.0f);
    }
    for (int64_t c = 0; c < d; ++c) {
        const float * kv = knt + c*n + base;
        for (int r = 0; r < RKV_ROWS; ++r) {
            for (int t = 0; t < w; ++t) {
                acc[r][t] += rows[r][c]*kv[t];
            }
        }
    }
}

// Rows [i0, i0 + nr), nr <= RKV_ROWS.
void rkv_scan_block(const float * kn, const float * knt, int64_t n, int64_t d, int64_t i0, int nr, float threshold,
                    int32_t * last, float * sim) {
    const float * rows[RKV_ROWS];
    bool done[RKV_ROWS];
    for (int r = 0; r < RKV_ROWS; ++r) {
        rows[r] = kn + (i0 + std::min(r, nr - 1))*d; // spare lanes repeat the last row
        done[r] = r >= nr;
        if (r < nr) {
            last[r] = -1;
            sim[r]  = 0.0f;
        }
    }
    int left = nr;
    float acc[RKV_ROWS][RKV_TILE];
    for (int64_t hi = n; hi > 0 && left > 0; hi -= RKV_TILE) {
        const int64_t base = std::max<int64_t>(0, hi - RKV_TILE);
        const int w = (int) (hi - base);
        if (w == RKV_TILE) {
            rkv_tile_full(rows, knt, n, d, base, acc);
        } else {
            rkv_tile_part(rows, knt, n, d, base, w, acc);
        }
        for (int r = 0; r < nr; ++r) {
            if (done[r]) {
                continue;
            }
            for (int t = w - 1; t >= 0; --t) {
                const int64_t j = base + t;
                if (j != i0 + r && acc[r][t] > threshold) {
                    last[r] = (int32_t) j;
                    sim[r]  = acc[r][t];
                    done[r] = true;
                    --left;
                    break;
                }
            }
        }
    }
}

void rkv_near_copy_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const float threshold = *(const float *) userdata;
    const ggml_tensor * kn  = dst->src[0]; // [d, n, n_head]
    const ggml_tensor * knt = dst->src[1]; // [n, d, n_head]
    const int64_t d = kn->ne[0];
    const int64_t n = kn->ne[1];
    const int64_t n_head = kn->ne[2];
    const int64_t blocks = (n + RKV_ROWS - 1)/RKV_ROWS;

    float * idx_out = (float *) dst->data;  // plane 0: [n, n_head]
    float * sim_out = idx_out + n*n_head;   // plane 1
    float * sum_out = sim_out + n*n_head;   // plane 2

    // the sum of all normalised keys of each head (every thread its own copy: n*d adds per head)
    static thread_local std::vector<double> total;
    total.assign((size_t) (n_head*d), 0.0);
    for (int64_t h = 0; h < n_head; ++h) {
        for (int64_t c = 0; c < d; ++c) {
            const float * row = (const float *) ((const char *) knt->data + h*knt->nb[2]) + c*n;
            double acc = 0.0;
            for (int64_t j = 0; j < n; ++j) {
                acc += row[j];
            }
            total[h*d + c] = acc;
        }
    }

    int32_t last[RKV_ROWS];
    float   sim[RKV_ROWS];
    // blocks dealt out in turn: neighbouring rows cost alike, so every thread gets a fair share
    for (int64_t b = ith; b < blocks*n_head; b += nth) {
        const int64_t h  = b/blocks;
        const int64_t i0 = (b % blocks)*RKV_ROWS;
        const int nr = (int) std::min<int64_t>(RKV_ROWS, n - i0);
        const float * kh = (const float *) ((const char *) kn->data + h*kn->nb[2]);
        rkv_scan_block(kh, (const float *) ((const char *) knt->data + h*knt->nb[2]), n, d, i0, nr, threshold, last, sim);
        for (int r = 0; r < nr; ++r) {
            idx_out[h*n + i0 + r] = (float) last[r];
            sim_out[h*n + i0 + r] = sim[r];
            // a key's similarity to all others: its dot with the sum of all keys, minus its own
            const float * ki = kh + (i0 + r)*d;
            double dot = 0.0, self = 0.0;
            for (int64_t c = 0; c < d; ++c) {
                dot  += total[h*d + c]*ki[c];
                self += (double) ki[c]*ki[c];
            }
            sum_out[h*n + i0 + r] = (float) (dot - self);
        }
    }
}

// Gathers n_rows rows of `row_bytes` at src + idx[j]*stride, then writes them to dst + j*stride.
void rkv_move_rows(uint8_t * base, size_t stride, const int32_t * idx, int64_t n_rows, size_t row_bytes,
                   std::vector<uint8_t> & tmp) {
    tmp.resize((size_t) n_rows*row_bytes);
    for (int64_t j = 0; j < n_rows; ++j) {
        std::memcpy(tmp.data() + j*row_bytes, base + (size_t) idx[j]*stride, row_bytes);
    }
    for (int64_t j = 0; j < n_rows; ++j) {
        std::memcpy(base + (size_t) j*stride, tmp.data() + j*row_bytes, row_bytes);
    }
}

template <typename T>
void rkv_move_elems(T * row, const int32_t * idx, int64_t n, std::vector<uint8_t> & tmp) {
    tmp.resize((size_t) n*sizeof(T));
    T * t = (T *) tmp.data();
    for (int64_t j = 0; j < n; ++j) {
        t[j] = row[idx[j]];
    }
    std::memcpy(row, t, (size_t) n*sizeof(T));
}

constexpr int64_t RKV_CHANNELS_PER_TASK = 16;

void rkv_compact_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const rkv_compact_cpu_params & p = *(const rkv_compact_cpu_params *) userdata;
    ggml_tensor * k = dst->src[0];
    ggml_tensor * v = p.has_v ? dst->src[1] : nullptr;
    const ggml_tensor * cells = dst->src[2];
    const auto cells_of = [&](int64_t h) {
        return (const int32_t *) ((const char *) cells->data + h*cells->nb[1]);
    };

    // tasks: the K heads, then the V heads (or groups of channels of a transposed V)
    const int64_t n_v_channels = p.v_trans ? v->ne[1] : 0;
    const int64_t n_v_tasks = !p.has_v ? 0 : p.v_trans ? (n_v_channels + RKV_CHANNELS_PER_TASK - 1)/RKV_CHANNELS_PER_TASK : p.n_head;
    static thread_local std::vector<uint8_t> tmp;
    for (int64_t t = ith; t < p.n_head + n_v_tasks; t += nth) {
        if (t < p.n_head) {
            rkv_move_rows((uint8_t *) k->data + t*p.k_head_bytes, k->nb[1], cells_of(t), p.n_dst, p.k_head_bytes, tmp);
        } else if (!p.v_trans) {
            const int64_t h = t - p.n_head;
            rkv_move_rows((uint8_t *) v->data + h*p.v_head_bytes, v->nb[1], cells_of(h), p.n_dst, p.v_head_bytes, tmp);
        } else {
            const int64_t c0 = (t - p.n_head)*RKV_CHANNELS_PER_TASK;
            const int64_t c1 = std::min(n_v_channels, c0 + RKV_CHANNELS_PER_TASK);
            const size_t es = ggml_element_size(v);
            for (int64_t c = c0; c < c1; ++c) {
                uint8_t * row = (uint8_t *) v->data + c*v->nb[1];
                const int32_t * idx = cells_of(c/p.v_head_dim);
                if (es == 2) {
                    rkv_move_elems((uint16_t *) row, idx, p.n_dst, tmp);
                } else if (es == 4) {
                    rkv_move_elems((uint32_t *) row, idx, p.n_dst, tmp);
                } else {
                    rkv_move_rows(row, es, idx, p.n_dst, es, tmp);
                }
            }
        }
    }
}

} // namespace

ggml_tensor * rkv_build_compaction_cpu(ggml_context * ctx, ggml_tensor * k, ggml_tensor * v, ggml_tensor * cells,
                                       const rkv_compact_cpu_params * p) {
    GGML_ASSERT(cells->type == GGML_TYPE_I32 && cells->ne[0] == p->n_dst && cells->ne[1] == p->n_head);
    ggml_tensor * args[3] = { k, v ? v : k, cells };
    return ggml_custom_4d(ctx, GGML_TYPE_I32, 1, 1, 1, 1, args, 3, rkv_compact_op, GGML_N_TASKS_MAX,
                          const_cast<rkv_compact_cpu_params *>(p));
}

void rkv_near_copy_rows(const float * kn, const float * knt, int64_t n, int64_t d, int64_t i0, int64_t i1,
                        float threshold, int32_t * last, float * sim) {
    for (int64_t i = i0; i < i1; i += RKV_ROWS) {
        const int nr = (int) std::min<int64_t>(RKV_ROWS, i1 - i);
        rkv_scan_block(kn, knt, n, d, i, nr, threshold, last + (i - i0), sim + (i - i0));
    }
}

ggml_tensor * rkv_build_near_copy_cpu(ggml_context * ctx, ggml_tensor * kn, const float * threshold) {
    GGML_ASSERT(kn->type == GGML_TYPE_F32 && ggml_is_contiguous(kn));
    ggml_tensor * knt = ggml_cont(ctx, ggml_transpose(ctx, kn)); // [n, d, n_head]
    ggml_tensor * args[2] = { kn, knt };
    return ggml_custom_4d(ctx, GGML_TYPE_F32, kn->ne[1], kn->ne[2], 3, 1, args, 2, rkv_near_copy_op,
                          GGML_N_TASKS_MAX, const_cast<float *>(threshold));
}

void rkv_near_copy_host(const float * kn, int64_t n, int64_t d, int64_t n_head, float threshold,
                        int32_t * last, float * sim) {
    std::vector<float> knt((size_t) n*d);
    for (int64_t h = 0; h < n_head; ++h) {
        const float * k = kn + h*n*d;
        for (int64_t j = 0; j < n; ++j) {
            for (int64_t c = 0; c < d; ++c) {
                knt[c*n + j] = k[j*d + c];
            }
        }
        rkv_near_copy_rows(k, knt.data(), n, d, 0, n, threshold, last + h*n, sim + h*n);
    }
}
