// Scoring and compaction of one stream as ggml graphs, run by the context's backend scheduler
// like the K-shift: every op is a stock ggml op, so CPU, CUDA, Metal and Vulkan all work.
// The spec of the scores is rkv_local/reference.py.
#include "rkv-engine.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"

#include "ggml-backend.h"

#include <algorithm>
#include <numeric>

// keys shorter than this are treated as zero vectors when normalised (reference.NORM_EPS)
static constexpr float RKV_NORM_EPS = 1e-12f;

// Host-filled inputs shared by every layer of a stream (same cells, same order).
struct rkv_graph_inputs {
    ggml_tensor * cells_all  = nullptr; // I32 [n, n_head_kv]: cells in time order, once per head
    ggml_tensor * cells_cand = nullptr; // I32 [n - window, n_head_kv]: the candidates
    ggml_tensor * q_rows     = nullptr; // I32 [n_q]: ring rows of the scoring queries, oldest first
    ggml_tensor * window     = nullptr; // I32 [window, n_head_kv]: order indices of the window
    ggml_tensor * offdiag    = nullptr; // F32 [n, n]: 0 on the diagonal, 1 elsewhere
    ggml_tensor * slots      = nullptr; // I32 [budget, n_head_kv]: 0 .. budget-1
    ggml_tensor * keep_fixed = nullptr; // I32 [budget, n_head_kv]: streamingllm's kept order indices
};

struct rkv_layer_view {
    ggml_tensor * keys;   // [d, kv_size, n_head_kv] view of the stream's K (any type)
    ggml_tensor * ring;   // F32 [n_embd_q, rows]
    int64_t       n_head;
    float         kq_scale;
};

// Attention the candidates receive: max over each query group of the scaled logits, softmax over
// the candidates, mean over the queries, max pooling. F32 [n - window, n_head_kv].
static ggml_tensor * rkv_build_importance(ggml_context * ctx, const rkv_layer_view & lv, const rkv_graph_inputs & in,
                                          int32_t kernel) {
    const int64_t d         = lv.keys->ne[0];
    const int64_t n_head_kv = lv.keys->ne[2];
    const int64_t n_cand    = in.cells_cand->ne[0];
    const int64_t n_q       = in.q_rows->ne[0];
    const int64_t group     = lv.n_head/n_head_kv;

    ggml_tensor * q = ggml_get_rows(ctx, lv.ring, in.q_rows);                      // [n_embd_q, n_q]
    q = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, q, d, lv.n_head, n_q), 0, 2, 1, 3)); // [d, n_q, n_head]

    ggml_tensor * k = ggml_get_rows(ctx, lv.keys, in.cells_cand);                 // [d, n_cand, n_head_kv]
    ggml_tensor * kq = ggml_scale(ctx, ggml_mul_mat(ctx, k, q), lv.kq_scale);     // [n_cand, n_q, n_head]
    if (group > 1) {
        kq = ggml_reshape_3d(ctx, kq, n_cand*n_q, group, n_head_kv);
        kq = ggml_pool_2d(ctx, kq, GGML_OP_POOL_MAX, 1, (int) group, 1, (int) group, 0, 0);
    }
    kq = ggml_soft_max(ctx, ggml_reshape_3d(ctx, kq, n_cand, n_q, n_head_kv));
    ggml_tensor * imp = ggml_mean(ctx, ggml_cont(ctx, ggml_permute(ctx, kq, 1, 0, 2, 3))); // [1, n_cand, n_head_kv]
    imp = ggml_reshape_2d(ctx, imp, n_cand, n_head_kv);
    if (kernel > 1) {
        imp = ggml_pool_1d(ctx, imp, GGML_OP_POOL_MAX, kernel, 1, kernel/2);
    }
    return imp;
}

// How much each candidate repeats other keys, one head at a time so the n x n work stays
// bounded by one head. F32 [n - window, n_head_kv].
static ggml_tensor * rkv_build_redundancy(ggml_context * ctx, const rkv_layer_view & lv, const rkv_graph_inputs & in,
                                          float threshold) {
    const int64_t d         = lv.keys->ne[0];
    const int64_t n_head_kv = lv.keys->ne[2];
    const int64_t n         = in.cells_all->ne[0];
    const int64_t n_cand    = in.cells_cand->ne[0];

    ggml_tensor * kn = ggml_l2_norm(ctx, ggml_get_rows(ctx, lv.keys, in.cells_all), RKV_NORM_EPS); // [d, n, n_head_kv]

    ggml_tensor * red = nullptr;
    for (int64_t h = 0; h < n_head_kv; ++h) {
        ggml_tensor * kh = ggml_view_2d(ctx, kn, d, n, kn->nb[1], h*kn->nb[2]);
        ggml_tensor * sim = ggml_mul(ctx, ggml_mul_mat(ctx, kh, kh), in.offdiag); // [n, n], row i along ne1
        // in each row, the most recent near-copy (> threshold) is not penalised
        ggml_tensor * hit    = ggml_step(ctx, ggml_scale_bias(ctx, sim, 1.0f, -threshold));
        ggml_tensor * n_seen = ggml_cumsum(ctx, hit);
        ggml_tensor * n_hits = ggml_sum_rows(ctx, hit);
        ggml_tensor * last   = ggml_mul(ctx, hit, ggml_step(ctx, ggml_scale_bias(ctx, ggml_sub(ctx, n_seen, n_hits), 1.0f, 0.5f)));
        sim = ggml_sub(ctx, sim, ggml_mul(ctx, sim, last));
        ggml_tensor * col = ggml_mean(ctx, ggml_cont(ctx, ggml_transpose(ctx, sim)));  // [1, n]
        col = ggml_soft_max(ctx, ggml_reshape_2d(ctx, col, n, 1));
        red = red ? ggml_concat(ctx, red, col, 1) : col;
    }
    return ggml_cont(ctx, ggml_view_2d(ctx, red, n_cand, n_head_kv, red->nb[1], 0));
}

// One scoring function per method: candidate scores, higher is kept. F32 [n - window, n_head_kv].
static ggml_tensor * rkv_build_scores(ggml_context * ctx, const rkv_params & p, const rkv_layer_view & lv,
                                      const rkv_graph_inputs & in) {
    switch (p.method) {
        case RKV_METHOD_RKV:
            return ggml_sub(ctx,
                    ggml_scale(ctx, rkv_build_importance(ctx, lv, in, p.kernel), p.lambda),
                    ggml_scale(ctx, rkv_build_redundancy(ctx, lv, in, p.threshold), 1.0f - p.lambda));
        case RKV_METHOD_SNAPKV:
            return rkv_build_importance(ctx, lv, in, p.kernel);
        case RKV_METHOD_H2O:
            return rkv_build_importance(ctx, lv, in, 1);
    }
    GGML_ABORT("method without scores");
}

// Order indices each head keeps, in time order: the best candidates, then the window. I32 [budget, n_head_kv].
static ggml_tensor * rkv_build_keep(ggml_context * ctx, const rkv_params & p, const rkv_layer_view & lv,
                                    const rkv_graph_inputs & in) {
    if (in.keep_fixed) {
        return in.keep_fixed;
    }
    const int64_t n_head_kv = lv.keys->ne[2];
    const int64_t m = p.budget - p.window;

    ggml_tensor * top = ggml_top_k(ctx, rkv_build_scores(ctx, p, lv, in), (int) m);       // I32 [m, n_head_kv], unordered
    ggml_tensor * by_time = ggml_argsort(ctx, ggml_cast(ctx, top, GGML_TYPE_F32), GGML_SORT_ORDER_ASC);
    top = ggml_reshape_2d(ctx, ggml_get_rows(ctx, ggml_reshape_3d(ctx, top, 1, m, n_head_kv), by_time), m, n_head_kv);
    return ggml_concat(ctx, top, in.window, 0);
}

// The compaction shared by all methods: head h's kept rows move, in order, to cells [0, budget).
static void rkv_build_compaction(ggml_context * ctx, ggml_cgraph * gf, ggml_tensor * t, bool transposed,
                                 uint32_t strm, int64_t head_dim, int64_t n_head_kv, uint32_t kv_size,
                                 ggml_tensor * cells, ggml_tensor * slots) {
    const int64_t budget = cells->ne[0];
    if (!transposed) {
        ggml_tensor * view = ggml_view_3d(ctx, t, head_dim, kv_size, n_head_kv,
                                          t->nb[1], ggml_row_size(t->type, head_dim), strm*t->nb[2]);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, view, ggml_get_rows(ctx, view, cells), slots));
        return;
    }
    // transposed V: channel c of cell i sits at c*kv_size + i
    const size_t es = ggml_element_size(t);
    const int64_t n_embd = head_dim*n_head_kv;
    ggml_tensor * vt = ggml_view_2d(ctx, t, kv_size, n_embd, kv_size*es, strm*t->nb[2]);
    ggml_tensor * rows = ggml_cont(ctx, ggml_transpose(ctx, vt));                          // [n_embd, kv_size]
    rows = ggml_view_3d(ctx, rows, head_dim, kv_size, n_head_kv, rows->nb[1], head_dim*es, 0);
    ggml_tensor * moved = ggml_cont(ctx, ggml_permute(ctx, ggml_get_rows(ctx, rows, cells), 1, 0, 2, 3)); // [budget, d, n_head_kv]
    ggml_tensor * dst = ggml_view_3d(ctx, t, budget, head_dim, n_head_kv, kv_size*es, head_dim*kv_size*es, strm*t->nb[2]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, moved, dst));
}

bool rkv_engine::run_compaction_graphs(uint32_t strm, llama_context * lctx, const std::vector<uint32_t> & order,
                                       std::vector<std::vector<int32_t>> & kept) {
    const uint32_t n       = (uint32_t) order.size();
    const uint32_t budget  = (uint32_t) params.budget;
    const uint32_t window  = (uint32_t) params.window;
    const uint32_t n_cand  = n - window;
    const uint32_t kv_size = kv.get_size();
    const int64_t  n_head_kv = kv.hparams.n_head_kv(kv.layers[0].il);
    const bool     fixed   = params.method == RKV_METHOD_STREAMINGLLM;
    const uint32_t n_q     = params.method == RKV_METHOD_H2O ? 1 : window;

    // host data of the inputs
    std::vector<int32_t> cells_all((size_t) n*n_head_kv), cells_cand((size_t) n_cand*n_head_kv);
    std::vector<int32_t> win((size_t) window*n_head_kv), slots((size_t) budget*n_head_kv), q_rows(n_q);
    for (int64_t h = 0; h < n_head_kv; ++h) {
        for (uint32_t i = 0; i < n; ++i) {
            cells_all[h*n + i] = (int32_t) order[i];
        }
        std::copy(cells_all.begin() + h*n, cells_all.begin() + h*n + n_cand, cells_cand.begin() + h*n_cand);
        for (uint32_t t = 0; t < window; ++t) {
            win[h*window + t] = (int32_t) (n_cand + t);
        }
        std::iota(slots.begin() + h*budget, slots.begin() + (h + 1)*budget, 0);
    }
    const llama_pos pos_last = kv.v_cells[strm].pos_get(order.back());
    for (uint32_t t = 0; t < n_q; ++t) {
        const llama_pos p = pos_last - (llama_pos) (n_q - 1 - t);
        q_rows[t] = (int32_t) (strm*window + ((p % (llama_pos) window) + window) % window);
    }
    std::vector<float> offdiag;
    if (params.method == RKV_METHOD_RKV) {
        offdiag.assign((size_t) n*n, 1.0f);
        for (uint32_t i = 0; i < n; ++i) {
            offdiag[(size_t) i*n + i] = 0.0f;
        }
    }
    std::vector<int32_t> keep_fixed;
    if (fixed) {
        // streamingllm: the first `sink` tokens, then the most recent ones
        const uint32_t m = budget - window;
        for (int64_t h = 0; h < n_head_kv; ++h) {
            for (uint32_t j = 0; j < budget; ++j) {
                const uint32_t sink = (uint32_t) params.sink;
                keep_fixed.push_back(j < sink ? j : j < m ? n_cand - (m - j) : n_cand + (j - m));
            }
        }
    }

    ggml_backend_sched_t sched = lctx->get_sched();
    llm_graph_result * res = lctx->get_gf_res_reserve();

    // layers per graph: stay well inside the graph's node capacity
    const size_t nodes_per_layer = 60 + 24*(size_t) n_head_kv;

    kept.assign(n_layer()*(size_t) n_head_kv, {});
    for (uint32_t l0 = 0; l0 < n_layer(); ) {
        ggml_backend_sched_reset(sched);
        res->reset();
        ggml_context * ctx = res->get_ctx();
        ggml_cgraph  * gf  = res->get_gf();
        const size_t per_graph = std::max<size_t>(1, (size_t) ggml_graph_size(gf)/nodes_per_layer);
        const uint32_t l1 = std::min<uint32_t>(n_layer(), l0 + (uint32_t) per_graph);

        rkv_graph_inputs in;
        auto input = [&](ggml_type type, int64_t ne0, int64_t ne1) {
            ggml_tensor * t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
            ggml_set_input(t);
            return t;
        };
        in.cells_all  = input(GGML_TYPE_I32, n, n_head_kv);
        in.cells_cand = input(GGML_TYPE_I32, n_cand, n_head_kv);
        in.q_rows     = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_q);
        ggml_set_input(in.q_rows);
        in.window     = input(GGML_TYPE_I32, window, n_head_kv);
        in.slots      = input(GGML_TYPE_I32, budget, n_head_kv);
        in.offdiag    = offdiag.empty() ? nullptr : input(GGML_TYPE_F32, n, n);
        in.keep_fixed = fixed ? input(GGML_TYPE_I32, budget, n_head_kv) : nullptr;

        std::vector<ggml_tensor *> keeps;
        for (uint32_t l = l0; l < l1; ++l) {
            const auto & layer = kv.layers[l];
            const int64_t d = kv.hparams.n_embd_head_k(layer.il);
            rkv_layer_view lv;
            lv.keys     = ggml_view_3d(ctx, layer.k, d, kv_size, n_head_kv, layer.k->nb[1],
                                       ggml_row_size(layer.k->type, d), strm*layer.k->nb[2]);
            lv.ring     = rings[l];
            lv.n_head   = kv.hparams.n_head(layer.il);
            lv.kq_scale = kq_scale[l];

            ggml_tensor * keep = rkv_build_keep(ctx, params, lv, in);
            if (!fixed) {
                ggml_set_output(keep);
            }
            keeps.push_back(keep);

            ggml_tensor * cells = ggml_reshape_2d(ctx,
                    ggml_get_rows(ctx, ggml_reshape_3d(ctx, in.cells_all, 1, n, n_head_kv), keep), budget, n_head_kv);
            rkv_build_compaction(ctx, gf, layer.k, false, strm, d, n_head_kv, kv_size, cells, in.slots);
            if (layer.v) {
                rkv_build_compaction(ctx, gf, layer.v, kv.v_trans, strm, kv.hparams.n_embd_head_v(layer.il),
                                     n_head_kv, kv_size, cells, in.slots);
            }
        }

        if (!ggml_backend_sched_alloc_graph(sched, gf)) {
            LLAMA_LOG_ERROR("%s: failed to allocate the compression graph\n", __func__);
            return false;
        }
        // inputs a method does not use stay out of the graph and unallocated
        auto set = [](ggml_tensor * t, const void * data) {
            if (t && t->buffer) {
                ggml_backend_tensor_set(t, data, 0, ggml_nbytes(t));
            }
        };
        set(in.cells_all, cells_all.data());
        set(in.cells_cand, cells_cand.data());
        set(in.q_rows, q_rows.data());
        set(in.window, win.data());
        set(in.slots, slots.data());
        set(in.offdiag, offdiag.data());
        set(in.keep_fixed, keep_fixed.data());

        if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
            LLAMA_LOG_ERROR("%s: failed to compute the compression graph\n", __func__);
            return false;
        }
        ggml_backend_sched_synchronize(sched);

        for (uint32_t l = l0; l < l1; ++l) {
            std::vector<int32_t> keep((size_t) budget*n_head_kv);
            if (fixed) {
                keep = keep_fixed;
            } else {
                ggml_backend_tensor_get(keeps[l - l0], keep.data(), 0, keep.size()*sizeof(int32_t));
            }
            for (int64_t h = 0; h < n_head_kv; ++h) {
                kept[(size_t) l*n_head_kv + h].assign(keep.begin() + h*budget, keep.begin() + (h + 1)*budget);
            }
        }

        size_t buf_size = 0;
        for (int i = 0; i < ggml_backend_sched_get_n_backends(sched); ++i) {
            buf_size += ggml_backend_sched_get_buffer_size(sched, ggml_backend_sched_get_backend(sched, i));
        }
        compute_buffer_bytes = std::max(compute_buffer_bytes, buf_size);

        l0 = l1;
    }
    return true;
}
