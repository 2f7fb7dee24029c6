// Scoring and compaction of one stream, run by the context's backend scheduler like the K-shift.
//
// The heavy work (Q.K over the candidates, the n x n key similarities, the K/V moves) is stock
// ggml ops, so CPU, CUDA, Metal and Vulkan all run it where the cache lives. Each layer and head
// then hands O(n) numbers to the host, which finishes the scores and picks the kept tokens with
// the tie rule of rkv_local/reference.py.
#include "rkv-engine.h"
#include "rkv-fused.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"

#include "ggml-backend.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>

// keys shorter than this are treated as zero vectors when normalised (reference.NORM_EPS)
static constexpr float RKV_NORM_EPS = 1e-12f;

// the n x n similarity matrices of this many bytes are built at once (several heads when small)
static constexpr int64_t RKV_SIM_BYTES = 32ll << 20;

// Host-filled inputs shared by every layer of a stream (same cells, same order).
struct rkv_score_inputs {
    ggml_tensor * cells_cand = nullptr; // I32 [n_cand, n_head_kv]: candidate cells, oldest first
    ggml_tensor * cells_all  = nullptr; // I32 [n, n_head_kv]: all cells, oldest first
    ggml_tensor * ramp       = nullptr; // F32 [n]: 1 .. n, makes the newest hit of a row its unique maximum
    ggml_tensor * q_rows     = nullptr; // I32 [n_q]: ring rows of the scoring queries, oldest first
    ggml_tensor * sim_bias   = nullptr; // F32 [n, n]: -threshold, and far below it on the diagonal
};

// What one layer's graphs leave for the host.
struct rkv_score_outputs {
    ggml_tensor * importance = nullptr; // F32 [n_cand, n_head_kv] (keydiff: its whole score; triattention: the
                                        // raw score of each query head, [group, n_cand, n_head_kv])
    ggml_tensor * sim_sum    = nullptr; // F32 [n, n_head_kv]: sum of a key's similarities to all others
    ggml_tensor * kn         = nullptr; // F32 [d, n, n_head_kv]: the normalised keys (input of the CUDA kernel)
    // portable graph
    ggml_tensor * last       = nullptr; // I32 [n, n_head_kv]: per key, the index of its newest near-copy
    ggml_tensor * last_sim   = nullptr; // F32 [n, n_head_kv]: the similarity to that key
    // fused CPU op
    ggml_tensor * near       = nullptr; // F32 [n, n_head_kv, 2]: index (-1: none) and similarity
};
// Attention the candidates receive: max over each query group of the scaled logits, softmax over
// the candidates (and the group's attention-sink logit, F32 [n_head_kv], when the model has sinks),
// mean over the queries, max pooling. F32 [n_cand, n_head_kv].
static ggml_tensor * rkv_build_importance(ggml_context * ctx, ggml_tensor * keys, ggml_tensor * ring, int64_t n_head,
                                          float kq_scale, const rkv_score_inputs & in, int32_t kernel,
                                          ggml_tensor * sinks) {
    const int64_t d         = keys->ne[0];
    const int64_t n_head_kv = keys->ne[2];
    const int64_t n_cand    = in.cells_cand->ne[0];
    const int64_t n_q       = in.q_rows->ne[0];
    const int64_t group     = n_head/n_head_kv;

    ggml_tensor * q = ggml_get_rows(ctx, ring, in.q_rows);                                  // [n_embd_q, n_q]
    q = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, q, d, n_head, n_q), 0, 2, 1, 3)); // [d, n_q, n_head]

    ggml_tensor * k  = ggml_get_rows(ctx, keys, in.cells_cand);                            // [d, n_cand, n_head_kv]
    // one product per KV head with all the queries of its group (query head h*group + g is KV head h's
    // g-th): the same layout as a broadcast over the query heads, in n_head_kv larger products. The
    // candidates are its columns: CUDA computes an F32 product of at most 16 columns on TF32 tensor
    // cores (mmf, which ignores ggml_prec_set_acc), one of n_cand columns in full F32 (cuBLAS)
    q = ggml_reshape_3d(ctx, q, d, n_q*group, n_head_kv);
    ggml_tensor * qk = ggml_mul_mat(ctx, q, k);                                              // [n_q*group, n_cand, n_head_kv]
    ggml_prec_set_acc(qk, GGML_PREC_F32);
    ggml_tensor * kq = ggml_scale(ctx, ggml_cont(ctx, ggml_transpose(ctx, qk)), kq_scale);  // [n_cand, n_q*group, n_head_kv]
    if (group > 1) {
        kq = ggml_reshape_3d(ctx, kq, n_cand*n_q, group, n_head_kv);
        kq = ggml_pool_2d(ctx, kq, GGML_OP_POOL_MAX, 1, (int) group, 1, (int) group, 0, 0);
    }
    kq = ggml_soft_max(ctx, ggml_reshape_3d(ctx, kq, n_cand, n_q, n_head_kv));
    ggml_soft_max_add_sinks(kq, sinks); // the sink takes its share of each query's attention, as in the model
    ggml_tensor * imp = ggml_mean(ctx, ggml_cont(ctx, ggml_permute(ctx, kq, 1, 0, 2, 3)));  // [1, n_cand, n_head_kv]
    imp = ggml_reshape_2d(ctx, imp, n_cand, n_head_kv);
    if (kernel > 1) {
        imp = ggml_pool_1d(ctx, imp, GGML_OP_POOL_MAX, kernel, 1, kernel/2);
    }
    return imp;
}

// KeyDiff: minus each candidate's cosine similarity to the mean of the head's normalised keys (all n
// of them), F32 [n_cand, n_head_kv]. Products as mul + sum_rows: F32 on every backend.
static ggml_tensor * rkv_build_keydiff(ggml_context * ctx, ggml_tensor * keys, const rkv_score_inputs & in) {
    const int64_t d         = keys->ne[0];
    const int64_t n_head_kv = keys->ne[2];
    const int64_t n_cand    = in.cells_cand->ne[0];

    ggml_tensor * kn = ggml_l2_norm(ctx, ggml_get_rows(ctx, keys, in.cells_all), RKV_NORM_EPS);        // [d, n, n_head_kv]
    ggml_tensor * anchor = ggml_mean(ctx, ggml_cont(ctx, ggml_permute(ctx, kn, 1, 0, 2, 3)));         // [1, d, n_head_kv]
    anchor = ggml_l2_norm(ctx, ggml_reshape_3d(ctx, anchor, d, 1, n_head_kv), RKV_NORM_EPS);
    ggml_tensor * cand = ggml_view_3d(ctx, kn, d, n_cand, n_head_kv, kn->nb[1], kn->nb[2], 0);
    ggml_tensor * cos  = ggml_sum_rows(ctx, ggml_mul(ctx, cand, anchor));                             // [1, n_cand, n_head_kv]
    return ggml_neg(ctx, ggml_reshape_2d(ctx, cos, n_cand, n_head_kv));
}

// TriAttention, before the host z-scores it: per query head, the logit of the mean rotated centre
// (q_eff, F32 [d, n_head]) with each candidate plus the norm term's weights (w, F32 [d/2, n_head]) on
// the candidate's pair moduli. F32 [group, n_cand, n_head_kv].
static ggml_tensor * rkv_build_triattention(ggml_context * ctx, ggml_tensor * keys, const rkv_score_inputs & in,
                                            ggml_tensor * q_eff, ggml_tensor * w, bool neox) {
    const int64_t d         = keys->ne[0];
    const int64_t half      = d/2;
    const int64_t n_head_kv = keys->ne[2];
    const int64_t n_cand    = in.cells_cand->ne[0];
    const int64_t group     = q_eff->ne[1]/n_head_kv;

    ggml_tensor * k  = ggml_get_rows(ctx, keys, in.cells_cand);                                   // [d, n_cand, n_head_kv]
    ggml_tensor * qk = ggml_mul_mat(ctx, ggml_reshape_3d(ctx, q_eff, d, group, n_head_kv), k);   // [group, n_cand, n_head_kv]
    ggml_prec_set_acc(qk, GGML_PREC_F32);

    ggml_tensor * moduli;                                                                        // [d/2, n_cand, n_head_kv]
    if (neox) {
        ggml_tensor * a = ggml_cont(ctx, ggml_view_3d(ctx, k, half, n_cand, n_head_kv, k->nb[1], k->nb[2], 0));
        ggml_tensor * b = ggml_cont(ctx, ggml_view_3d(ctx, k, half, n_cand, n_head_kv, k->nb[1], k->nb[2], half*k->nb[0]));
        moduli = ggml_sqrt(ctx, ggml_add(ctx, ggml_sqr(ctx, a), ggml_sqr(ctx, b)));
    } else {
        ggml_tensor * pairs = ggml_sum_rows(ctx, ggml_reshape_2d(ctx, ggml_sqr(ctx, k), 2, half*n_cand*n_head_kv));
        moduli = ggml_sqrt(ctx, ggml_reshape_3d(ctx, pairs, half, n_cand, n_head_kv));
    }
    ggml_tensor * norm = ggml_mul_mat(ctx, ggml_reshape_3d(ctx, w, half, group, n_head_kv), moduli);
    ggml_prec_set_acc(norm, GGML_PREC_F32);
    return ggml_add(ctx, qk, norm);
}

// triattention's host side of a KV head: each query head's raw scores (the graph's layout, [group, n_cand]
// per KV head) z-scored over the candidates, then the max over the group
static void rkv_triattention_finish(const float * raw, int64_t group, int64_t n_cand, std::vector<double> & score) {
    score.assign(n_cand, -INFINITY);
    for (int64_t g = 0; g < group; ++g) {
        double mean = 0.0;
        for (int64_t j = 0; j < n_cand; ++j) {
            mean += raw[g + group*j];
        }
        mean /= (double) n_cand;
        double var = 0.0;
        for (int64_t j = 0; j < n_cand; ++j) {
            const double x = raw[g + group*j] - mean;
            var += x*x;
        }
        const double sd = std::max(std::sqrt(var/(double) n_cand), 1e-6); // reference.TRI_STD_FLOOR
        for (int64_t j = 0; j < n_cand; ++j) {
            score[j] = std::max(score[j], (raw[g + group*j] - mean)/sd);
        }
    }
}

// The parts of the redundancy that need all pairs of keys. Column sums of the similarity matrix
// are rank-one work (symmetry: a key's column sum is its dot with the sum of all keys); only the
// newest near-copy of each key needs all pairs: the fused op (CPU), the device kernel after the
// graph (CUDA: the graph leaves the normalised keys), or the portable n x n graph, one group of
// heads at a time to bound the buffer.
static void rkv_build_similarity(ggml_context * ctx, ggml_tensor * keys, const rkv_score_inputs & in, int32_t path,
                                 const float * threshold, rkv_score_outputs & out) {
    const int64_t d         = keys->ne[0];
    const int64_t n_head_kv = keys->ne[2];
    const int64_t n         = in.cells_all->ne[0];

    ggml_tensor * kn = ggml_l2_norm(ctx, ggml_get_rows(ctx, keys, in.cells_all), RKV_NORM_EPS); // [d, n, n_head_kv]

    if (path == RKV_PATH_CPU) {
        out.near = rkv_build_near_copy_cpu(ctx, kn, threshold); // the similarity sums too
        return;
    }

    ggml_tensor * total = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, kn, 1, 0, 2, 3)));   // [1, d, n_head_kv]
    total = ggml_reshape_3d(ctx, total, d, 1, n_head_kv);
    ggml_tensor * dots = ggml_mul_mat(ctx, total, kn);                                       // [1, n, n_head_kv]
    ggml_tensor * self = ggml_sum_rows(ctx, ggml_sqr(ctx, kn));                              // [1, n, n_head_kv]
    out.sim_sum = ggml_reshape_2d(ctx, ggml_sub(ctx, dots, self), n, n_head_kv);

    if (path == RKV_PATH_CUDA) {
        out.kn = kn;
        return;
    }

    // heads in groups whose n x n matrices fit RKV_SIM_BYTES: few graph nodes, a bounded buffer
    const int64_t heads = std::max<int64_t>(1, std::min<int64_t>(n_head_kv, RKV_SIM_BYTES/(n*n*(int64_t) sizeof(float))));
    for (int64_t h0 = 0; h0 < n_head_kv; h0 += heads) {
        const int64_t hn = std::min(heads, n_head_kv - h0);
        ggml_tensor * kh  = ggml_view_3d(ctx, kn, d, n, hn, kn->nb[1], kn->nb[2], h0*kn->nb[2]);
        ggml_tensor * hit = ggml_step(ctx, ggml_add(ctx, ggml_mul_mat(ctx, kh, kh), in.sim_bias)); // [n, n, hn]
        // hits weighted by their index: argmax picks the newest near-copy whatever a backend does on ties
        ggml_tensor * last = ggml_argmax(ctx, ggml_reshape_2d(ctx, ggml_mul(ctx, hit, in.ramp), n, n*hn)); // I32 [n*hn]
        last = ggml_reshape_2d(ctx, last, n, hn);
        // the similarity to that copy: per head, gather its row and dot
        ggml_tensor * copy = ggml_get_rows(ctx, kh, last);                                    // [d, n, hn]
        ggml_tensor * sim  = ggml_reshape_2d(ctx, ggml_sum_rows(ctx, ggml_mul(ctx, copy, kh)), n, hn);
        out.last     = out.last     ? ggml_concat(ctx, out.last,     last, 1) : last;
        out.last_sim = out.last_sim ? ggml_concat(ctx, out.last_sim, sim,  1) : sim;
    }
}

// Host side of the redundancy: column means with each key's newest near-copy not penalised,
// softmax over all n keys; the first n_cand values.
static void rkv_redundancy(const float * sim_sum, const int32_t * last, const float * last_sim, int64_t n,
                           int64_t n_cand, float threshold, std::vector<double> & red) {
    std::vector<double> col(sim_sum, sim_sum + n);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t j = last[i];
        // a row without near-copies is all zeros and argmax points anywhere (the fused paths say -1): not a hit
        // the index comes from a device: never trusted to stay inside the host's row
        if (j >= 0 && j < n && j != i && last_sim[i] > threshold) {
            col[j] -= last_sim[i];
        }
    }
    double mx = -INFINITY;
    for (double & c : col) {
        c /= (double) n;
        mx = std::max(mx, c);
    }
    double sum = 0.0;
    for (double & c : col) {
        c = std::exp(c - mx);
        sum += c;
    }
    red.resize(n_cand);
    for (int64_t j = 0; j < n_cand; ++j) {
        red[j] = col[j]/sum;
    }
}

// The best `m` candidates by score, ties to the older token, in time order; then the window.
static void rkv_select(const std::vector<double> & score, int64_t m, int64_t n, std::vector<int32_t> & keep) {
    const int64_t n_cand = (int64_t) score.size();
    std::vector<int32_t> idx(n_cand);
    std::iota(idx.begin(), idx.end(), 0);
    // a strict total order (ties to the older token), so the m best are one set whatever the algorithm
    std::nth_element(idx.begin(), idx.begin() + m, idx.end(), [&](int32_t a, int32_t b) {
        return score[a] != score[b] ? score[a] > score[b] : a < b;
    });
    keep.assign(idx.begin(), idx.begin() + m);
    std::sort(keep.begin(), keep.end());
    for (int64_t j = n_cand; j < n; ++j) {
        keep.push_back((int32_t) j);
    }
}

// The compaction shared by all methods: head h's cells move, in order, to cells [0, n_dst).
static void rkv_build_compaction(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * t, bool transposed,
                                 uint32_t strm, int64_t head_dim, int64_t n_head_kv, uint32_t kv_size,
                                 ggml_tensor * cells, ggml_tensor * slots) {
    const int64_t n_dst = cells->ne[0];
    if (!transposed) {
        ggml_tensor * view = ggml_view_3d(ctx, t, head_dim, kv_size, n_head_kv,
                                          t->nb[1], ggml_row_size(t->type, head_dim), strm*t->nb[2]);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, view, ggml_get_rows(ctx, view, cells), slots));
        return;
    }
    // transposed V: channel c of cell i sits at c*kv_size + i
    const size_t es = ggml_element_size(t);
    const int64_t n_embd = head_dim*n_head_kv;
    ggml_tensor * vt   = ggml_view_2d(ctx, t, kv_size, n_embd, kv_size*es, strm*t->nb[2]);
    ggml_tensor * rows = ggml_cont(ctx, ggml_transpose(ctx, vt));                                  // [n_embd, kv_size]
    rows = ggml_view_3d(ctx, rows, head_dim, kv_size, n_head_kv, rows->nb[1], head_dim*es, 0);
    ggml_tensor * moved = ggml_cont(ctx, ggml_permute(ctx, ggml_get_rows(ctx, rows, cells), 1, 0, 2, 3)); // [n_dst, d, n_head_kv]
    ggml_tensor * dst = ggml_view_3d(ctx, t, n_dst, head_dim, n_head_kv, kv_size*es, head_dim*kv_size*es, strm*t->nb[2]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, moved, dst));
}

// Resets the scheduler's reserve graph for a new build.
static void rkv_graph_begin(llama_context * lctx, ggml_context ** ctx, ggml_cgraph ** gf) {
    ggml_backend_sched_reset(lctx->get_sched());
    llm_graph_result * res = lctx->get_gf_res_reserve();
    res->reset();
    *ctx = res->get_ctx();
    *gf  = res->get_gf();
}

static ggml_tensor * rkv_new_input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1 = 1, int64_t ne2 = 1) {
    ggml_tensor * t = ggml_new_tensor_3d(ctx, type, ne0, ne1, ne2);
    ggml_set_input(t);
    return t;
}

// inputs a method does not use stay out of the graph and unallocated
static void rkv_set_input(ggml_tensor * t, const void * data) {
    if (t && t->buffer) {
        ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
    }
}

int32_t rkv_engine::redundancy_path(uint32_t layer) const {
    if (params.method != RKV_METHOD_RKV) {
        return RKV_PATH_NONE;
    }
    if (params.kernels == RKV_KERNELS_PORTABLE) {
        return RKV_PATH_PORTABLE;
    }
    ggml_backend_buffer_t buf = kv.layers[layer].k->buffer;
    if (ggml_backend_buffer_is_host(buf)) {
        return RKV_PATH_CPU;
    }
#ifdef RKV_HAVE_CUDA
    if (std::strncmp(ggml_backend_buft_name(ggml_backend_buffer_get_type(buf)), "CUDA", 4) == 0) {
        return RKV_PATH_CUDA;
    }
#endif
    return RKV_PATH_PORTABLE; // Metal, Vulkan, ...: stock ops only
}

// the normalised keys one group of layers may hand to the host at once (the CUDA path)
static constexpr size_t RKV_GROUP_KEY_BYTES = 64u << 20;

namespace {
// wall time of the phases of a compression
struct rkv_clock {
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    // seconds since the last lap, added to `phase`
    void lap(double & phase) {
        const auto now = std::chrono::steady_clock::now();
        phase += std::chrono::duration<double>(now - t).count();
        t = now;
    }
};
} // namespace

bool rkv_engine::run_scoring_graphs(uint32_t strm, llama_context * lctx, const std::vector<uint32_t> & order,
                                    std::vector<std::vector<int32_t>> & kept, rkv_profile & prof) {
    rkv_clock clock;
    const int64_t  n         = (int64_t) order.size();
    const int64_t  budget    = params.budget;
    const int64_t  window    = params.window;
    const int64_t  n_cand    = n - window;
    const int64_t  m         = budget - window;
    const uint32_t kv_size   = kv.get_size();
    const int64_t  n_head_kv = kv.hparams.n_head_kv(kv.layers[0].il);
    const bool     redundant = params.method == RKV_METHOD_RKV;
    const bool     scored    = params.method != RKV_METHOD_STREAMINGLLM;
    const bool     keydiff   = params.method == RKV_METHOD_KEYDIFF;
    const bool     tri_att   = params.method == RKV_METHOD_TRIATTENTION;
    const int64_t  n_q       = params.method == RKV_METHOD_H2O ? 1 : window;
    const int32_t  kernel    = params.method == RKV_METHOD_H2O ? 1 : params.kernel;

    ggml_backend_sched_t sched = lctx->get_sched();

    std::vector<int32_t> paths(n_layer());
    bool portable = false;
    for (uint32_t l = 0; l < n_layer(); ++l) {
        paths[l] = redundancy_path(l);
        portable = portable || paths[l] == RKV_PATH_PORTABLE;
    }
    prof.redundancy_path = paths.empty() ? RKV_PATH_NONE : paths.back();

    // host data of the inputs
    std::vector<int32_t> cells_all(n*n_head_kv), cells_cand(n_cand*n_head_kv);
    std::vector<int32_t> q_rows(n_q);
    for (int64_t h = 0; h < n_head_kv; ++h) {
        for (int64_t i = 0; i < n; ++i) {
            cells_all[h*n + i] = (int32_t) order[i];
        }
        std::copy(cells_all.begin() + h*n, cells_all.begin() + h*n + n_cand, cells_cand.begin() + h*n_cand);
    }
    const llama_pos pos_last = kv.v_cells[strm].pos_get(order.back());
    if (tri_att) {
        for (uint32_t l = 0; l < n_layer(); ++l) {
            if (tri[l].centres.empty()) {
                LLAMA_LOG_ERROR("%s: triattention: layer %d has no query statistics (rkv_set_query_stats)\n", __func__,
                                kv.layers[l].il);
                return false;
            }
        }
    }
    std::vector<float> q_eff, tri_w;
    for (int64_t t = 0; t < n_q; ++t) {
        const llama_pos p = pos_last - (llama_pos) (n_q - 1 - t);
        q_rows[t] = (int32_t) (strm*window + ((p % (llama_pos) window) + window) % window);
    }
    // the portable graph's bias and ramp depend on n only: kept for the next compression
    if (redundant && portable && (int64_t) ramp.size() != n) {
        sim_bias.assign(n*n, -params.threshold);
        for (int64_t i = 0; i < n; ++i) {
            sim_bias[i*n + i] = -params.threshold - 4.0f; // a key is not its own near-copy
        }
        ramp.resize(n);
        std::iota(ramp.begin(), ramp.end(), 1.0f);
    }

    // order indices kept by each layer and head
    kept.assign(n_layer()*n_head_kv, {});
    if (!scored) {
        // streamingllm: the first `sink` tokens and the most recent ones
        std::vector<int32_t> keep;
        for (int64_t j = 0; j < budget; ++j) {
            keep.push_back((int32_t) (j < params.sink ? j : j < m ? n_cand - (m - j) : n_cand + (j - m)));
        }
        std::fill(kept.begin(), kept.end(), keep);
    }
    clock.lap(prof.host_seconds);

    // layers per graph: stay well inside the graph's node capacity, and bound what the group's layers
    // hand to the host at once (the CUDA path keeps each layer's normalised keys, n x d x heads floats,
    // until the kernel has read them: 420 MiB for 13 layers at n = 8K, d = 128, 8 heads)
    const size_t nodes_per_layer = 48 + 16*(size_t) n_head_kv;
    const size_t kn_bytes_per_layer = (size_t) n*n_head_kv*kv.hparams.n_embd_head_k(kv.layers[0].il)*sizeof(float);
    const size_t max_group_layers = std::max<size_t>(1, RKV_GROUP_KEY_BYTES/kn_bytes_per_layer);

    // per layer of a group: importance [n_cand*n_head_kv]; sim_sum, last, last_sim [n*n_head_kv]
    std::vector<std::vector<float>> imp;
    std::vector<std::vector<float>> sim_sum, last_sim;
    std::vector<std::vector<int32_t>> last;
    std::vector<float> near;
    std::vector<float> kn_host;

    for (uint32_t l0 = 0; l0 < n_layer() && scored; ) {
        ggml_context * ctx;
        ggml_cgraph  * gf;

        // importance of the candidates, a group of layers per graph
        rkv_graph_begin(lctx, &ctx, &gf);
        const uint32_t l1 = std::min<uint32_t>(n_layer(), l0 + (uint32_t) std::min(max_group_layers,
            std::max<size_t>(1, ggml_graph_size(gf)/nodes_per_layer)));
        rkv_score_inputs in;
        in.cells_cand = rkv_new_input(ctx, GGML_TYPE_I32, n_cand, n_head_kv);
        in.q_rows     = rkv_new_input(ctx, GGML_TYPE_I32, n_q);
        in.cells_all  = keydiff ? rkv_new_input(ctx, GGML_TYPE_I32, n, n_head_kv) : nullptr;
        std::vector<rkv_score_outputs> outs(l1 - l0);
        std::vector<ggml_tensor *> keys(l1 - l0), sinks_in(l1 - l0, nullptr);
        std::vector<ggml_tensor *> q_eff_in(l1 - l0, nullptr), tri_w_in(l1 - l0, nullptr);
        for (uint32_t l = l0; l < l1; ++l) {
            const auto & layer = kv.layers[l];
            const int64_t d = kv.hparams.n_embd_head_k(layer.il);
            keys[l - l0] = ggml_view_3d(ctx, layer.k, d, kv_size, n_head_kv, layer.k->nb[1],
                                        ggml_row_size(layer.k->type, d), strm*layer.k->nb[2]);
            if (!sinks[l].empty()) {
                sinks_in[l - l0] = rkv_new_input(ctx, GGML_TYPE_F32, n_head_kv);
            }
            if (tri_att) {
                q_eff_in[l - l0] = rkv_new_input(ctx, GGML_TYPE_F32, d, kv.hparams.n_head(layer.il));
                tri_w_in[l - l0] = rkv_new_input(ctx, GGML_TYPE_F32, d/2, kv.hparams.n_head(layer.il));
                outs[l - l0].importance = rkv_build_triattention(ctx, keys[l - l0], in, q_eff_in[l - l0], tri_w_in[l - l0],
                                                                 tri[l].neox);
            } else if (keydiff) {
                outs[l - l0].importance = rkv_build_keydiff(ctx, keys[l - l0], in);
            } else {
                outs[l - l0].importance = rkv_build_importance(ctx, keys[l - l0], rings[l], kv.hparams.n_head(layer.il),
                                                               kq_scale[l], in, kernel, sinks_in[l - l0]);
            }
            ggml_set_output(outs[l - l0].importance);
            ggml_build_forward_expand(gf, outs[l - l0].importance);
        }
        if (!ggml_backend_sched_alloc_graph(sched, gf)) {
            LLAMA_LOG_ERROR("%s: failed to allocate the importance graph\n", __func__);
            return false;
        }
        rkv_set_input(in.cells_cand, cells_cand.data());
        rkv_set_input(in.q_rows, q_rows.data());
        rkv_set_input(in.cells_all, cells_all.data());
        for (uint32_t l = l0; l < l1; ++l) {
            rkv_set_input(sinks_in[l - l0], sinks[l].data());
            if (tri_att) {
                triattention_queries(l, pos_last + 1, q_eff, tri_w);
                rkv_set_input(q_eff_in[l - l0], q_eff.data());
                rkv_set_input(tri_w_in[l - l0], tri_w.data());
            }
        }
        clock.lap(prof.build_seconds);
        if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
            LLAMA_LOG_ERROR("%s: failed to compute the importance graph\n", __func__);
            return false;
        }
        ggml_backend_sched_synchronize(sched);
        clock.lap(prof.importance_seconds);
        note_compute_buffer(sched);
        imp.resize(l1 - l0);
        for (uint32_t l = l0; l < l1; ++l) {
            imp[l - l0].resize(ggml_nelements(outs[l - l0].importance)); // triattention: one row per query head
            ggml_backend_tensor_get(outs[l - l0].importance, imp[l - l0].data(), 0, imp[l - l0].size()*sizeof(float));
        }
        clock.lap(prof.host_seconds);

        // redundancy: the same layers, a second graph
        if (redundant) {
            rkv_graph_begin(lctx, &ctx, &gf);
            in = rkv_score_inputs();
            in.cells_all = rkv_new_input(ctx, GGML_TYPE_I32, n, n_head_kv);
            if (portable) {
                in.ramp     = rkv_new_input(ctx, GGML_TYPE_F32, n);
                in.sim_bias = rkv_new_input(ctx, GGML_TYPE_F32, n, n);
            }
            for (uint32_t l = l0; l < l1; ++l) {
                const auto & layer = kv.layers[l];
                const int64_t d = kv.hparams.n_embd_head_k(layer.il);
                ggml_tensor * k = ggml_view_3d(ctx, layer.k, d, kv_size, n_head_kv, layer.k->nb[1],
                                               ggml_row_size(layer.k->type, d), strm*layer.k->nb[2]);
                rkv_score_outputs & out = outs[l - l0];
                rkv_build_similarity(ctx, k, in, paths[l], &params.threshold, out);
                for (ggml_tensor * t : { out.sim_sum, out.kn, out.last, out.last_sim, out.near }) {
                    if (t) {
                        ggml_set_output(t);
                        ggml_build_forward_expand(gf, t);
                    }
                }
            }
            if (!ggml_backend_sched_alloc_graph(sched, gf)) {
                LLAMA_LOG_ERROR("%s: failed to allocate the similarity graph\n", __func__);
                return false;
            }
            rkv_set_input(in.cells_all, cells_all.data());
            rkv_set_input(in.ramp, ramp.data());
            rkv_set_input(in.sim_bias, sim_bias.data());
            clock.lap(prof.build_seconds);
            if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
                LLAMA_LOG_ERROR("%s: failed to compute the similarity graph\n", __func__);
                return false;
            }
            ggml_backend_sched_synchronize(sched);
            note_compute_buffer(sched);

            sim_sum.resize(l1 - l0);
            last.resize(l1 - l0);
            last_sim.resize(l1 - l0);
            for (uint32_t l = l0; l < l1; ++l) {
                const rkv_score_outputs & out = outs[l - l0];
                auto & lst = last[l - l0];
                auto & ls  = last_sim[l - l0];
                lst.resize(n*n_head_kv);
                ls.resize(n*n_head_kv);
                if (out.kn) {
                    // CUDA: the kernel reads the normalised keys where the graph left them
                    const int64_t d = out.kn->ne[0];
                    bool done = false;
#ifdef RKV_HAVE_CUDA
                    done = rkv_cuda_near_copy(out.kn->data, out.kn->nb[1], out.kn->nb[2], d, n, n_head_kv,
                                              params.threshold, lst.data(), ls.data());
#endif
                    if (!done) {
                        if (!warned_host_scan) {
                            warned_host_scan = true;
                            LLAMA_LOG_WARN("%s: the device kernel for the newest near-copy is not available here (see the "
                                           "message above, if any): the host scans the keys instead, on one core, "
                                           "after reading them back; compressions will be slower\n", __func__);
                        }
                        kn_host.resize(n*n_head_kv*d);
                        ggml_backend_tensor_get(out.kn, kn_host.data(), 0, kn_host.size()*sizeof(float));
                        rkv_near_copy_host(kn_host.data(), n, d, n_head_kv, params.threshold, lst.data(), ls.data());
                        prof.redundancy_path = RKV_PATH_HOST;
                    }
                } else if (out.near) {
                    near.resize(3*n*n_head_kv);
                    ggml_backend_tensor_get(out.near, near.data(), 0, near.size()*sizeof(float));
                    sim_sum[l - l0].assign(near.begin() + 2*n*n_head_kv, near.end());
                    for (int64_t i = 0; i < n*n_head_kv; ++i) {
                        lst[i] = (int32_t) near[i];
                        ls[i]  = near[n*n_head_kv + i];
                    }
                } else {
                    ggml_backend_tensor_get(out.last, lst.data(), 0, lst.size()*sizeof(int32_t));
                    ggml_backend_tensor_get(out.last_sim, ls.data(), 0, ls.size()*sizeof(float));
                }
            }
            clock.lap(prof.redundancy_seconds);
            for (uint32_t l = l0; l < l1; ++l) {
                if (outs[l - l0].sim_sum) {
                    sim_sum[l - l0].resize(n*n_head_kv);
                    ggml_backend_tensor_get(outs[l - l0].sim_sum, sim_sum[l - l0].data(), 0, sim_sum[l - l0].size()*sizeof(float));
                }
            }
        }

        // host: finish the scores, pick the kept tokens
        std::vector<double> score(n_cand), red;
        for (uint32_t l = l0; l < l1; ++l) {
            for (int64_t h = 0; h < n_head_kv; ++h) {
                if (redundant) {
                    rkv_redundancy(sim_sum[l - l0].data() + h*n, last[l - l0].data() + h*n, last_sim[l - l0].data() + h*n,
                                   n, n_cand, params.threshold, red);
                }
                if (tri_att) {
                    const int64_t group = (int64_t) imp[l - l0].size()/(n_cand*n_head_kv);
                    rkv_triattention_finish(imp[l - l0].data() + h*group*n_cand, group, n_cand, score);
                    rkv_select(score, m, n, kept[l*n_head_kv + h]);
                    continue;
                }
                const float * im = imp[l - l0].data() + h*n_cand;
                for (int64_t j = 0; j < n_cand; ++j) {
                    const double importance = im[j];
                    score[j] = redundant ? params.lambda*importance - (1.0 - params.lambda)*red[j] : importance;
                }
                rkv_select(score, m, n, kept[l*n_head_kv + h]);
            }
        }
        clock.lap(prof.host_seconds);
        l0 = l1;
    }

    return true;
}

bool rkv_engine::run_compaction_graphs(uint32_t strm, llama_context * lctx, const std::vector<int32_t> & cells,
                                       int64_t n_dst, rkv_profile & prof) {
    rkv_clock clock;
    const uint32_t kv_size   = kv.get_size();
    const int64_t  n_head_kv = kv.hparams.n_head_kv(kv.layers[0].il);
    ggml_backend_sched_t sched = lctx->get_sched();

    std::vector<int32_t> slots(n_dst*n_head_kv);
    for (int64_t h = 0; h < n_head_kv; ++h) {
        std::iota(slots.begin() + h*n_dst, slots.begin() + (h + 1)*n_dst, 0);
    }

    // move the kept rows of every layer: in place on the CPU when the whole cache lives there, else
    // with get_rows/set_rows (every backend)
    bool fused_moves = params.kernels == RKV_KERNELS_AUTO;
    for (const auto & layer : kv.layers) {
        fused_moves = fused_moves && ggml_backend_buffer_is_host(layer.k->buffer) &&
                      (!layer.v || ggml_backend_buffer_is_host(layer.v->buffer));
    }
    prof.fused_moves = fused_moves;
    rkv_compact_cpu_params moves = {};
    if (fused_moves) {
        const auto & layer = kv.layers[0]; // every layer has the same head sizes (rkv_engine::check)
        moves.n_dst        = n_dst;
        moves.n_head       = n_head_kv;
        moves.k_head_bytes = ggml_row_size(layer.k->type, kv.hparams.n_embd_head_k(layer.il));
        moves.has_v        = layer.v != nullptr;
        moves.v_trans      = kv.v_trans;
        if (layer.v) {
            moves.v_head_bytes = ggml_row_size(layer.v->type, kv.hparams.n_embd_head_v(layer.il));
            moves.v_head_dim   = kv.hparams.n_embd_head_v(layer.il);
        }
    }
    const size_t moves_per_layer = 16;
    for (uint32_t l0 = 0; l0 < n_layer(); ) {
        ggml_context * ctx;
        ggml_cgraph  * gf;
        rkv_graph_begin(lctx, &ctx, &gf);
        const uint32_t l1 = std::min<uint32_t>(n_layer(), l0 + (uint32_t) std::max<size_t>(1, ggml_graph_size(gf)/moves_per_layer));

        ggml_tensor * slots_in = rkv_new_input(ctx, GGML_TYPE_I32, n_dst, n_head_kv);
        ggml_tensor * cells_in = rkv_new_input(ctx, GGML_TYPE_I32, n_dst, n_head_kv, l1 - l0);
        for (uint32_t l = l0; l < l1; ++l) {
            const auto & layer = kv.layers[l];
            ggml_tensor * layer_cells = ggml_view_2d(ctx, cells_in, n_dst, n_head_kv, cells_in->nb[1], (l - l0)*cells_in->nb[2]);
            if (fused_moves) {
                ggml_tensor * k = ggml_view_2d(ctx, layer.k, layer.k->ne[0], kv_size, layer.k->nb[1], strm*layer.k->nb[2]);
                ggml_tensor * v = nullptr;
                if (layer.v && kv.v_trans) {
                    const size_t es = ggml_element_size(layer.v);
                    v = ggml_view_2d(ctx, layer.v, kv_size, layer.v->ne[0], kv_size*es, strm*layer.v->nb[2]);
                } else if (layer.v) {
                    v = ggml_view_2d(ctx, layer.v, layer.v->ne[0], kv_size, layer.v->nb[1], strm*layer.v->nb[2]);
                }
                ggml_build_forward_expand(gf, rkv_build_compaction_cpu(ctx, k, v, layer_cells, &moves));
                continue;
            }
            rkv_build_compaction(ctx, gf, layer.k, false, strm, kv.hparams.n_embd_head_k(layer.il), n_head_kv, kv_size,
                                 layer_cells, slots_in);
            if (layer.v) {
                rkv_build_compaction(ctx, gf, layer.v, kv.v_trans, strm, kv.hparams.n_embd_head_v(layer.il), n_head_kv,
                                     kv_size, layer_cells, slots_in);
            }
        }
        if (!ggml_backend_sched_alloc_graph(sched, gf)) {
            LLAMA_LOG_ERROR("%s: failed to allocate the compaction graph\n", __func__);
            return false;
        }
        rkv_set_input(slots_in, slots.data());
        rkv_set_input(cells_in, cells.data() + (size_t) l0*n_head_kv*n_dst);
        clock.lap(prof.build_seconds);
        if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
            LLAMA_LOG_ERROR("%s: failed to compute the compaction graph\n", __func__);
            return false;
        }
        ggml_backend_sched_synchronize(sched);
        clock.lap(prof.compaction_seconds);
        note_compute_buffer(sched);
        l0 = l1;
    }
    return true;
}

void rkv_engine::note_compute_buffer(ggml_backend_sched_t sched) {
    size_t size = 0;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
        size += ggml_backend_sched_get_buffer_size(sched, ggml_backend_sched_get_backend(sched, i));
    }
    compute_buffer_bytes = std::max(compute_buffer_bytes, size);
}
