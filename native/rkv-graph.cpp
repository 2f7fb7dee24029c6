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
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>

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
    ggml_tensor * near       = nullptr; // F32 [n, n_head_kv, 3]: index (-1: none), similarity, similarity sum
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

// What one compression of a stream scores, the same for every layer: sizes, the method's switches
// and the host data of the graphs' inputs.
struct rkv_scoring {
    int64_t   n, n_cand, m, n_head_kv, n_q;
    int32_t   kernel;    // pooling width of the importance (1: none)
    bool      redundant; // rkv: importance minus redundancy
    bool      keydiff;
    bool      tri_att;
    llama_pos pos_last;  // position of the newest token
    std::vector<int32_t> paths;                 // redundancy path per layer
    std::vector<int32_t> cells_all, cells_cand; // [n_head_kv][n], [n_head_kv][n_cand]
    std::vector<int32_t> q_rows;                // [n_q]
};

// What the graphs of a group of layers hand to the host, per layer of the group.
struct rkv_group_scores {
    std::vector<std::vector<float>>   imp;      // importance (triattention: one row per query head)
    std::vector<std::vector<float>>   sim_sum;  // [n_head_kv][n]
    std::vector<std::vector<int32_t>> last;     // [n_head_kv][n]: newest near-copy of each key
    std::vector<std::vector<float>>   last_sim; // [n_head_kv][n]: the similarity to it
};

namespace {

// RKV_TEST_FAIL=scoring fails the first importance graph; RKV_TEST_FAIL=compaction:L gives every layer
// its own compaction graph and fails the one of KV-cache layer L (the layers before it have moved):
// real failure paths for the tests of what a failed compression leaves behind. layer -1: any layer.
bool rkv_forced_failure(const char * phase, int64_t layer = -1) {
    const char * what = getenv("RKV_TEST_FAIL");
    const size_t len = std::strlen(phase);
    if (!what || std::strncmp(what, phase, len) != 0 || (what[len] != '\0' && what[len] != ':')) {
        return false;
    }
    return layer < 0 || what[len] == '\0' || std::strtoll(what + len + 1, nullptr, 10) == layer;
}
} // namespace

// Allocates gf on the context's scheduler, fills its inputs, computes it and waits for it: every
// graph of a compression makes this round trip.
static bool rkv_compute(rkv_engine & eng, uint32_t strm, llama_context * lctx, ggml_cgraph * gf, const char * what,
                        const std::function<void()> & set_inputs, rkv_clock & clock, rkv_profile & prof,
                        double & compute_seconds, bool * computing = nullptr) {
    ggml_backend_sched_t sched = lctx->get_sched();
    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        return eng.fail(strm, std::string("failed to allocate the ") + what + " graph");
    }
    set_inputs();
    clock.lap(prof.build_seconds);
    if (computing) {
        *computing = true; // from here a failure may leave the graph's writes half done
    }
    if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        return eng.fail(strm, std::string("failed to compute the ") + what + " graph");
    }
    ggml_backend_sched_synchronize(sched);
    clock.lap(compute_seconds);
    eng.note_compute_buffer(sched);
    return true;
}

ggml_tensor * rkv_engine::key_view(ggml_context * ctx, uint32_t strm, uint32_t l) const {
    const auto & layer = kv.layers[l];
    const int64_t d = kv.hparams.n_embd_head_k(layer.il);
    return ggml_view_3d(ctx, layer.k, d, kv.get_size(), kv.hparams.n_head_kv(layer.il), layer.k->nb[1],
                        ggml_row_size(layer.k->type, d), strm*layer.k->nb[2]);
}

// Phase 1: the host data of the inputs.
bool rkv_engine::scoring_begin(uint32_t strm, const std::vector<uint32_t> & order, rkv_scoring & sc, rkv_profile & prof) {
    sc.n         = (int64_t) order.size();
    sc.n_cand    = sc.n - params.window;
    sc.m         = params.budget - params.window;
    sc.n_head_kv = kv.hparams.n_head_kv(kv.layers[0].il);
    sc.redundant = params.method == RKV_METHOD_RKV;
    sc.keydiff   = params.method == RKV_METHOD_KEYDIFF;
    sc.tri_att   = params.method == RKV_METHOD_TRIATTENTION;
    sc.n_q       = params.method == RKV_METHOD_H2O ? 1 : params.window;
    sc.kernel    = params.method == RKV_METHOD_H2O ? 1 : params.kernel;
    sc.pos_last  = kv.v_cells[strm].pos_get(order.back());

    sc.paths.resize(n_layer());
    for (uint32_t l = 0; l < n_layer(); ++l) {
        sc.paths[l] = redundancy_path(l);
        if (sc.tri_att && tri[l].centres.empty()) {
            return fail(strm, "triattention: layer " + std::to_string(kv.layers[l].il) +
                                  " has no query statistics (rkv_set_query_stats)");
        }
    }
    prof.redundancy_path = sc.paths.empty() ? RKV_PATH_NONE : sc.paths.back();

    const int64_t n = sc.n, n_cand = sc.n_cand;
    sc.cells_all.resize(n*sc.n_head_kv);
    sc.cells_cand.resize(n_cand*sc.n_head_kv);
    for (int64_t h = 0; h < sc.n_head_kv; ++h) {
        for (int64_t i = 0; i < n; ++i) {
            sc.cells_all[h*n + i] = (int32_t) order[i];
        }
        std::copy(sc.cells_all.begin() + h*n, sc.cells_all.begin() + h*n + n_cand, sc.cells_cand.begin() + h*n_cand);
    }
    const llama_pos window = params.window;
    sc.q_rows.resize(sc.n_q);
    for (int64_t t = 0; t < sc.n_q; ++t) {
        const llama_pos p = sc.pos_last - (llama_pos) (sc.n_q - 1 - t);
        sc.q_rows[t] = (int32_t) (strm*window + ((p % window) + window) % window);
    }
    // the portable graph's bias and ramp depend on n only: kept for the next compression
    const bool portable = std::count(sc.paths.begin(), sc.paths.end(), RKV_PATH_PORTABLE) > 0;
    if (sc.redundant && portable && (int64_t) ramp.size() != n) {
        sim_bias.assign(n*n, -params.threshold);
        for (int64_t i = 0; i < n; ++i) {
            sim_bias[i*n + i] = -params.threshold - 4.0f; // a key is not its own near-copy
        }
        ramp.resize(n);
        std::iota(ramp.begin(), ramp.end(), 1.0f);
    }
    return true;
}

// Phase 2: the importance of the candidates in layers [l0, l1), one graph.
bool rkv_engine::score_importance(uint32_t strm, llama_context * lctx, const rkv_scoring & sc, uint32_t l0, uint32_t l1,
                                  rkv_group_scores & out, rkv_clock & clock, rkv_profile & prof) {
    ggml_context * ctx;
    ggml_cgraph  * gf;
    rkv_graph_begin(lctx, &ctx, &gf);
    rkv_score_inputs in;
    in.cells_cand = rkv_new_input(ctx, GGML_TYPE_I32, sc.n_cand, sc.n_head_kv);
    in.q_rows     = rkv_new_input(ctx, GGML_TYPE_I32, sc.n_q);
    in.cells_all  = sc.keydiff ? rkv_new_input(ctx, GGML_TYPE_I32, sc.n, sc.n_head_kv) : nullptr;
    std::vector<ggml_tensor *> importance(l1 - l0), sinks_in(l1 - l0, nullptr);
    std::vector<ggml_tensor *> q_eff_in(l1 - l0, nullptr), tri_w_in(l1 - l0, nullptr);
    for (uint32_t l = l0; l < l1; ++l) {
        const auto & layer = kv.layers[l];
        ggml_tensor * keys = key_view(ctx, strm, l);
        const int64_t d = keys->ne[0];
        const int64_t n_head = kv.hparams.n_head(layer.il);
        if (!sinks[l].empty()) {
            sinks_in[l - l0] = rkv_new_input(ctx, GGML_TYPE_F32, sc.n_head_kv);
        }
        ggml_tensor * & imp = importance[l - l0];
        if (sc.tri_att) {
            q_eff_in[l - l0] = rkv_new_input(ctx, GGML_TYPE_F32, d, n_head);
            tri_w_in[l - l0] = rkv_new_input(ctx, GGML_TYPE_F32, d/2, n_head);
            imp = rkv_build_triattention(ctx, keys, in, q_eff_in[l - l0], tri_w_in[l - l0], tri[l].neox);
        } else if (sc.keydiff) {
            imp = rkv_build_keydiff(ctx, keys, in);
        } else {
            imp = rkv_build_importance(ctx, keys, rings[l], n_head, kq_scale[l], in, sc.kernel, sinks_in[l - l0]);
        }
        ggml_set_output(imp);
        ggml_build_forward_expand(gf, imp);
    }
    if (rkv_forced_failure("scoring")) {
        return fail(strm, "RKV_TEST_FAIL: the importance graph fails");
    }
    std::vector<float> q_eff, tri_w;
    const auto set_inputs = [&]() {
        rkv_set_input(in.cells_cand, sc.cells_cand.data());
        rkv_set_input(in.q_rows, sc.q_rows.data());
        rkv_set_input(in.cells_all, sc.cells_all.data());
        for (uint32_t l = l0; l < l1; ++l) {
            rkv_set_input(sinks_in[l - l0], sinks[l].data());
            if (sc.tri_att) {
                triattention_queries(l, sc.pos_last + 1, q_eff, tri_w);
                rkv_set_input(q_eff_in[l - l0], q_eff.data());
                rkv_set_input(tri_w_in[l - l0], tri_w.data());
            }
        }
    };
    if (!rkv_compute(*this, strm, lctx, gf, "importance", set_inputs, clock, prof, prof.importance_seconds)) {
        return false;
    }
    out.imp.resize(l1 - l0);
    for (uint32_t l = l0; l < l1; ++l) {
        out.imp[l - l0].resize(ggml_nelements(importance[l - l0]));
        ggml_backend_tensor_get(importance[l - l0], out.imp[l - l0].data(), 0, out.imp[l - l0].size()*sizeof(float));
    }
    clock.lap(prof.host_seconds);
    return true;
}

// The newest near-copy of every key from the normalised keys the CUDA graph leaves: the device
// kernel where it can run, else a scan on the host.
static void rkv_near_copy_of_normalised(rkv_engine & eng, ggml_tensor * kn, int64_t n, int64_t n_head_kv,
                                        int32_t * last, float * last_sim, rkv_profile & prof) {
    const int64_t d = kn->ne[0];
    bool done = false;
#ifdef RKV_HAVE_CUDA
    done = rkv_cuda_near_copy(kn->data, kn->nb[1], kn->nb[2], d, n, n_head_kv, eng.params.threshold, last, last_sim);
#endif
    if (done) {
        return;
    }
    if (!eng.warned_host_scan) {
        eng.warned_host_scan = true;
        LLAMA_LOG_WARN("%s: the device kernel for the newest near-copy is not available here (see the message above, "
                       "if any): the host scans the keys instead, on one core, after reading them back; compressions "
                       "will be slower\n", __func__);
    }
    std::vector<float> kn_host(n*n_head_kv*d);
    ggml_backend_tensor_get(kn, kn_host.data(), 0, kn_host.size()*sizeof(float));
    rkv_near_copy_host(kn_host.data(), n, d, n_head_kv, eng.params.threshold, last, last_sim);
    prof.redundancy_path = RKV_PATH_HOST;
}

// Phase 3 (rkv): the similarity terms of the same layers, a second graph; each layer's path
// (fused CPU op, CUDA kernel, portable graph) leaves them in its own form.
bool rkv_engine::score_redundancy(uint32_t strm, llama_context * lctx, const rkv_scoring & sc, uint32_t l0, uint32_t l1,
                                  rkv_group_scores & out, rkv_clock & clock, rkv_profile & prof) {
    const int64_t n = sc.n, nh = sc.n*sc.n_head_kv;
    ggml_context * ctx;
    ggml_cgraph  * gf;
    rkv_graph_begin(lctx, &ctx, &gf);
    rkv_score_inputs in;
    in.cells_all = rkv_new_input(ctx, GGML_TYPE_I32, n, sc.n_head_kv);
    if (std::count(sc.paths.begin() + l0, sc.paths.begin() + l1, RKV_PATH_PORTABLE) > 0) {
        in.ramp     = rkv_new_input(ctx, GGML_TYPE_F32, n);
        in.sim_bias = rkv_new_input(ctx, GGML_TYPE_F32, n, n);
    }
    std::vector<rkv_score_outputs> outs(l1 - l0);
    for (uint32_t l = l0; l < l1; ++l) {
        rkv_build_similarity(ctx, key_view(ctx, strm, l), in, sc.paths[l], &params.threshold, outs[l - l0]);
        for (ggml_tensor * t : { outs[l - l0].sim_sum, outs[l - l0].kn, outs[l - l0].last, outs[l - l0].last_sim,
                                 outs[l - l0].near }) {
            if (t) {
                ggml_set_output(t);
                ggml_build_forward_expand(gf, t);
            }
        }
    }
    const auto set_inputs = [&]() {
        rkv_set_input(in.cells_all, sc.cells_all.data());
        rkv_set_input(in.ramp, ramp.data());
        rkv_set_input(in.sim_bias, sim_bias.data());
    };
    // the redundancy's time: the graph, the kernel and the read-back
    if (!rkv_compute(*this, strm, lctx, gf, "similarity", set_inputs, clock, prof, prof.redundancy_seconds)) {
        return false;
    }

    out.sim_sum.resize(l1 - l0);
    out.last.resize(l1 - l0);
    out.last_sim.resize(l1 - l0);
    std::vector<float> near;
    for (uint32_t l = l0; l < l1; ++l) {
        const rkv_score_outputs & o = outs[l - l0];
        auto & last = out.last[l - l0];
        auto & last_sim = out.last_sim[l - l0];
        auto & sim_sum = out.sim_sum[l - l0];
        last.resize(nh);
        last_sim.resize(nh);
        if (o.kn) {
            rkv_near_copy_of_normalised(*this, o.kn, n, sc.n_head_kv, last.data(), last_sim.data(), prof);
        } else if (o.near) {
            near.resize(3*nh);
            ggml_backend_tensor_get(o.near, near.data(), 0, near.size()*sizeof(float));
            sim_sum.assign(near.begin() + 2*nh, near.end());
            for (int64_t i = 0; i < nh; ++i) {
                last[i]     = (int32_t) near[i];
                last_sim[i] = near[nh + i];
            }
        } else {
            ggml_backend_tensor_get(o.last, last.data(), 0, last.size()*sizeof(int32_t));
            ggml_backend_tensor_get(o.last_sim, last_sim.data(), 0, last_sim.size()*sizeof(float));
        }
    }
    clock.lap(prof.redundancy_seconds);
    for (uint32_t l = l0; l < l1; ++l) {
        if (outs[l - l0].sim_sum) {
            out.sim_sum[l - l0].resize(nh);
            ggml_backend_tensor_get(outs[l - l0].sim_sum, out.sim_sum[l - l0].data(), 0, nh*sizeof(float));
        }
    }
    return true;
}

// Phase 4, on the host: finish the scores of each layer and head of the group and pick what it keeps.
static void rkv_select_group(const rkv_engine & eng, const rkv_scoring & sc, uint32_t l0, uint32_t l1,
                             const rkv_group_scores & g, std::vector<std::vector<int32_t>> & kept) {
    const int64_t n = sc.n, n_cand = sc.n_cand;
    const double lambda = eng.params.lambda;
    std::vector<double> score(n_cand), red;
    for (uint32_t l = l0; l < l1; ++l) {
        const std::vector<float> & imp = g.imp[l - l0];
        for (int64_t h = 0; h < sc.n_head_kv; ++h) {
            std::vector<int32_t> & keep = kept[l*sc.n_head_kv + h];
            if (sc.tri_att) {
                const int64_t group = (int64_t) imp.size()/(n_cand*sc.n_head_kv);
                rkv_triattention_finish(imp.data() + h*group*n_cand, group, n_cand, score);
                rkv_select(score, sc.m, n, keep);
                continue;
            }
            if (sc.redundant) {
                rkv_redundancy(g.sim_sum[l - l0].data() + h*n, g.last[l - l0].data() + h*n,
                               g.last_sim[l - l0].data() + h*n, n, n_cand, eng.params.threshold, red);
            }
            for (int64_t j = 0; j < n_cand; ++j) {
                const double importance = imp[h*n_cand + j];
                score[j] = sc.redundant ? lambda*importance - (1.0 - lambda)*red[j] : importance;
            }
            rkv_select(score, sc.m, n, keep);
        }
    }
}

// the normalised keys one group of layers may hand to the host at once (the CUDA path)
static constexpr size_t RKV_GROUP_KEY_BYTES = 64u << 20;

bool rkv_engine::run_scoring_graphs(uint32_t strm, llama_context * lctx, const std::vector<uint32_t> & order,
                                    std::vector<std::vector<int32_t>> & kept, rkv_profile & prof) {
    rkv_clock clock;
    rkv_scoring sc;
    if (!scoring_begin(strm, order, sc, prof)) {
        return false;
    }
    kept.assign(n_layer()*sc.n_head_kv, {});
    if (params.method == RKV_METHOD_STREAMINGLLM) {
        // the first `sink` tokens and the most recent ones
        std::vector<int32_t> keep;
        for (int64_t j = 0; j < params.budget; ++j) {
            keep.push_back((int32_t) (j < params.sink ? j : j < sc.m ? sc.n_cand - (sc.m - j) : sc.n_cand + (j - sc.m)));
        }
        std::fill(kept.begin(), kept.end(), keep);
        clock.lap(prof.host_seconds);
        return true;
    }
    clock.lap(prof.host_seconds);

    // layers per graph: stay well inside the graph's node capacity, and bound what the group's layers
    // hand to the host at once (the CUDA path keeps each layer's normalised keys, n x d x heads floats,
    // until the kernel has read them: 420 MiB for 13 layers at n = 8K, d = 128, 8 heads)
    const size_t nodes_per_layer = 48 + 16*(size_t) sc.n_head_kv;
    const size_t kn_bytes_per_layer = (size_t) sc.n*sc.n_head_kv*kv.hparams.n_embd_head_k(kv.layers[0].il)*sizeof(float);
    const size_t max_nodes = (size_t) lctx->get_gf_res_reserve()->get_max_nodes();
    const uint32_t group = (uint32_t) std::min(std::max<size_t>(1, RKV_GROUP_KEY_BYTES/kn_bytes_per_layer),
                                               std::max<size_t>(1, max_nodes/nodes_per_layer));

    rkv_group_scores scores;
    for (uint32_t l0 = 0; l0 < n_layer(); l0 += group) {
        const uint32_t l1 = std::min(n_layer(), l0 + group);
        if (!score_importance(strm, lctx, sc, l0, l1, scores, clock, prof) ||
            (sc.redundant && !score_redundancy(strm, lctx, sc, l0, l1, scores, clock, prof))) {
            return false;
        }
        rkv_select_group(*this, sc, l0, l1, scores, kept);
        clock.lap(prof.host_seconds);
    }
    return true;
}

bool rkv_engine::run_compaction_graphs(uint32_t strm, llama_context * lctx, const std::vector<int32_t> & cells,
                                       int64_t n_dst, rkv_profile & prof, uint32_t & n_moved) {
    rkv_clock clock;
    const uint32_t kv_size   = kv.get_size();
    const int64_t  n_head_kv = kv.hparams.n_head_kv(kv.layers[0].il);
    n_moved = 0;

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
    const bool forced = rkv_forced_failure("compaction"); // the hook is set: a graph per layer
    const uint32_t group = forced ? 1 : (uint32_t) std::max<size_t>(1, lctx->get_gf_res_reserve()->get_max_nodes()/moves_per_layer);
    for (uint32_t l0 = 0; l0 < n_layer(); l0 += group) {
        const uint32_t l1 = std::min(n_layer(), l0 + group);
        ggml_context * ctx;
        ggml_cgraph  * gf;
        rkv_graph_begin(lctx, &ctx, &gf);

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
        if (rkv_forced_failure("compaction", l0)) {
            return fail(strm, "RKV_TEST_FAIL: the compaction graph of layer " + std::to_string(kv.layers[l0].il) + " fails");
        }
        const auto set_inputs = [&]() {
            rkv_set_input(slots_in, slots.data());
            rkv_set_input(cells_in, cells.data() + (size_t) l0*n_head_kv*n_dst);
        };
        bool computing = false;
        const bool ok = rkv_compute(*this, strm, lctx, gf, "compaction", set_inputs, clock, prof, prof.compaction_seconds,
                                    &computing);
        n_moved = computing ? l1 : l0;
        if (!ok) {
            return false;
        }
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
