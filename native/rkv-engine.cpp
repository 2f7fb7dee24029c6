#include "rkv-engine.h"


#include "llama-batch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>

rkv_engine::rkv_engine(llama_kv_cache & kv, const llama_kv_cache * swa, const rkv_params & params) : kv(kv), swa(swa), params(params) {
    const uint32_t n_rows = kv.n_stream*params.window + 1;

    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_by_buft;
    for (const auto & layer : kv.layers) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);
        if (!ctx_by_buft.count(buft)) {
            ggml_init_params ip = { kv.layers.size()*ggml_tensor_overhead(), nullptr, true };
            ggml_context * ctx = ggml_init(ip);
            if (!ctx) {
                throw std::runtime_error("failed to create the query-ring context");
            }
            ctxs_bufs.emplace_back(ggml_context_ptr(ctx), nullptr);
            ctx_by_buft[buft] = ctx;
        }
        const int64_t n_embd_q = (int64_t) kv.hparams.n_head(layer.il)*kv.hparams.n_embd_head_k(layer.il);
        ggml_tensor * ring = ggml_new_tensor_2d(ctx_by_buft[buft], GGML_TYPE_F32, n_embd_q, n_rows);
        ggml_format_name(ring, "rkv_q_ring_l%d", layer.il);
        rings.push_back(ring);
    }
    for (auto & [buft, ctx] : ctx_by_buft) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (!buf) {
            throw std::runtime_error("failed to allocate the query rings");
        }
        ggml_backend_buffer_clear(buf, 0);
        for (auto & cb : ctxs_bufs) {
            if (cb.first.get() == ctx) {
                cb.second.reset(buf);
            }
        }
    }

    // the scale most models use, until the attention graph records the model's own: a state restored
    // into a fresh context may be compressed before any graph was built
    kq_scale.clear();
    for (const auto & layer : kv.layers) {
        const float f = kv.hparams.f_attention_scale;
        kq_scale.push_back(f != 0.0f ? f : 1.0f/std::sqrt((float) kv.hparams.n_embd_head_k(layer.il)));
    }
    // the sink logits are weights of the model: read once, reduced over each query group
    for (const auto & layer : kv.layers) {
        std::vector<float> group_max;
        const ggml_tensor * t = kv.model.layers[layer.il].attn_sinks;
        if (t) {
            const uint32_t n_head = kv.hparams.n_head(layer.il);
            const uint32_t group  = n_head/kv.hparams.n_head_kv(layer.il);
            std::vector<float> all(n_head);
            ggml_backend_tensor_get(t, all.data(), 0, n_head*sizeof(float));
            group_max.assign(n_head/group, -INFINITY);
            for (uint32_t h = 0; h < n_head; ++h) {
                group_max[h/group] = std::max(group_max[h/group], all[h]);
            }
        }
        sinks.push_back(std::move(group_max));
    }
    streams.resize(kv.n_stream);
}

std::string rkv_engine::check(const llama_kv_cache & kv, const llama_context & lctx, const rkv_params & p) {
    const auto & hp = kv.hparams;
    const auto & cp = lctx.get_cparams();

    if (p.method < RKV_METHOD_RKV || p.method > RKV_METHOD_TRIATTENTION) {
        return "unknown method " + std::to_string(p.method) + " (0 rkv, 1 snapkv, 2 h2o, 3 streamingllm, 4 keydiff, "
               "5 triattention)";
    }
    if (p.window < 1) {
        return "window must be at least 1, got " + std::to_string(p.window);
    }
    if (p.budget <= p.window) {
        return "budget (" + std::to_string(p.budget) + ") must exceed the window (" + std::to_string(p.window) + ")";
    }
    if (p.buffer < 1) {
        return "buffer must be at least 1, got " + std::to_string(p.buffer);
    }
    if (p.kernel < 1 || p.kernel % 2 == 0) {
        return "pooling kernel must be odd and positive, got " + std::to_string(p.kernel);
    }
    if (!(p.lambda >= 0.0f && p.lambda <= 1.0f)) {
        return "lambda must lie in [0, 1], got " + std::to_string(p.lambda);
    }
    if (!(p.threshold >= 0.0f && p.threshold <= 1.0f)) {
        return "similarity threshold must lie in [0, 1], got " + std::to_string(p.threshold);
    }
    if (p.kernels != RKV_KERNELS_AUTO && p.kernels != RKV_KERNELS_PORTABLE) {
        return "unknown kernels " + std::to_string(p.kernels) + " (0 auto, 1 portable)";
    }
    if (p.method == RKV_METHOD_STREAMINGLLM && (p.sink < 0 || p.sink > p.budget - p.window)) {
        return "sink (" + std::to_string(p.sink) + ") must lie in [0, budget - window]";
    }

    if (kv.other || kv.v_cells_impl.use_count() > 1) {
        return "caches that share cells with another cache are not supported";
    }
    if (kv.swa_type != LLAMA_SWA_TYPE_NONE || kv.n_swa > 0) {
        return "the cache of sliding-window layers is bounded by llama.cpp already and is not compressed";
    }
    if (hp.swa_type != LLAMA_SWA_TYPE_NONE && hp.swa_type != LLAMA_SWA_TYPE_STANDARD) {
        // a truncation must know which tokens the window layers still need
        return "chunked or symmetric sliding-window attention (e.g. Llama 4) is not supported; only the standard "
               "sliding window (gpt-oss, Gemma 3)";
    }
    if (hp.attn_soft_cap) {
        return "attention logit soft-capping (e.g. Gemma 2) is not supported: the importance would not be the "
               "model's attention";
    }
    if (hp.use_alibi) {
        return "ALiBi positional biases are not supported";
    }
    if (hp.n_pos_per_embd() > 1) {
        return "multi-axis positions (M-RoPE) are not supported";
    }
    if (kv.n_embd_head_k_all < 0 || kv.n_embd_head_v_all < 0) {
        return "models whose layers have different head sizes are not supported";
    }
    if (kv.layers.empty()) {
        return hp.swa_type != LLAMA_SWA_TYPE_NONE
            ? "every attention layer of this model uses a sliding window: its cache never grows past the window"
            : "the cache holds no attention layers";
    }
    if (kv.n_stream == 1 && kv.n_seq_max > 1) {
        return "a unified cache (kv_unified) shared by several sequences is not supported; use one stream per sequence";
    }
    const uint32_t need = (uint32_t) (p.budget + p.buffer);
    if (kv.get_size() < need) {
        return "the cache holds " + std::to_string(kv.get_size()) + " cells per sequence but budget + buffer = " +
               std::to_string(need) + ": create the context with n_ctx >= " + std::to_string(need);
    }
    // batch_fits holds each sequence to `buffer` tokens per decode call; several streams share a call
    if (cp.n_batch > (uint32_t) p.buffer * kv.n_stream) {
        return "n_batch (" + std::to_string(cp.n_batch) + ") exceeds the buffer (" + std::to_string(p.buffer) +
               ") times the streams (" + std::to_string(kv.n_stream) + "): one decode call may carry at most `buffer` "
               "tokens of a sequence; create the context with n_batch = n_ubatch <= buffer per sequence";
    }
    for (const auto & layer : kv.layers) {
        if (layer.v == nullptr) {
            // MLA (DeepSeek-V2/V3, Kimi): one latent K row per token, V read out of it
            return "caches that keep no V rows (multi-head latent attention, e.g. deepseek2) are not supported";
        }
        const ggml_tensor * sinks = kv.model.layers[layer.il].attn_sinks;
        if (sinks && (sinks->type != GGML_TYPE_F32 || sinks->ne[0] != (int64_t) hp.n_head(layer.il))) {
            return "attention sinks that are not one F32 logit per query head are not supported";
        }
        if (hp.n_head_kv(layer.il) != hp.n_head_kv(kv.layers[0].il)) {
            return "models whose layers have different numbers of KV heads are not supported";
        }
        if (hp.n_head(layer.il) % hp.n_head_kv(layer.il) != 0) {
            return "query heads are not a multiple of KV heads";
        }
        if (ggml_row_size(layer.k->type, hp.n_embd_head_k(layer.il)) * hp.n_head_kv(layer.il) != (size_t) layer.k->nb[1] &&
            ggml_row_size(layer.k->type, hp.n_embd_k_gqa(layer.il)) != (size_t) layer.k->nb[1]) {
            return "unexpected K row layout";
        }
        for (const ggml_tensor * t : { layer.k, layer.v }) {
            // a device's compaction moves rows through F32 (get_rows/set_rows): the types whose
            // quantization of their own dequantized rows gives the same bytes
            if (t->type == GGML_TYPE_IQ4_NL) {
                return "iq4_nl K/V is not supported: a compaction on a device quantizes each kept row again, and "
                       "iq4_nl's search for the best scale does not give back the same bytes; use q4_0 or q8_0";
            }
        }
        if (ggml_blck_size(layer.k->type) > 1 && hp.n_embd_head_k(layer.il) % ggml_blck_size(layer.k->type) != 0) {
            return "quantized K rows are not aligned to heads";
        }
        if (!kv.v_trans && ggml_blck_size(layer.v->type) > 1 && hp.n_embd_head_v(layer.il) % ggml_blck_size(layer.v->type) != 0) {
            return "quantized V rows are not aligned to heads";
        }
    }
    return "";
}

int32_t rkv_engine::kv_layer(int32_t il) const {
    const auto it = kv.map_layer_ids.find(il);
    return it == kv.map_layer_ids.end() ? -1 : it->second;
}

bool rkv_engine::window_layer(int32_t il) const {
    return swa && swa->map_layer_ids.count(il) > 0;
}

std::vector<int32_t> rkv_engine::model_layers() const {
    std::vector<int32_t> out;
    for (const auto & layer : kv.layers) {
        out.push_back((int32_t) layer.il);
    }
    std::sort(out.begin(), out.end());
    return out;
}

uint32_t rkv_engine::stream_of(llama_seq_id seq_id) const {
    return kv.seq_to_stream[seq_id < 0 ? 0 : seq_id];
}

uint32_t rkv_engine::n_head_kv(uint32_t layer) const {
    return kv.hparams.n_head_kv(kv.layers[layer].il);
}

uint32_t rkv_engine::trash_row() const {
    return kv.n_stream*params.window;
}

std::vector<uint32_t> rkv_engine::cells_in_order(uint32_t strm) const {
    const auto & cells = kv.v_cells[strm];
    std::vector<uint32_t> order;
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i)) {
            order.push_back(i);
        }
    }
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
        return cells.pos_get(a) < cells.pos_get(b);
    });
    return order;
}

llama_pos rkv_engine::true_pos(uint32_t strm, uint32_t layer, uint32_t head, uint32_t cell) const {
    const auto & st = streams[strm];
    if (cell >= st.n_keep && cell < st.n_keep + st.n_compact) {
        const uint32_t n_head_kv = kv.hparams.n_head_kv(kv.layers[layer].il);
        return st.slot_pos[((size_t) layer*n_head_kv + head)*st.n_compact + cell - st.n_keep];
    }
    return kv.v_cells[strm].pos_get(cell);
}

void rkv_engine::read_queries(uint32_t strm, uint32_t layer, const std::vector<uint32_t> & order, std::vector<float> & out) const {
    const ggml_tensor * ring = rings[layer];
    const int64_t n_embd_q = ring->ne[0];
    const uint32_t w = params.window;

    std::vector<float> raw((size_t) n_embd_q*w);
    ggml_backend_tensor_get(ring, raw.data(), (size_t) strm*w*ring->nb[1], raw.size()*sizeof(float));

    // ring row of position p is p % window: put the newest query last
    const llama_pos pos_last = kv.v_cells[strm].pos_get(order.back());
    out.resize(raw.size());
    for (uint32_t t = 0; t < w; ++t) {
        const llama_pos p = pos_last - (llama_pos) (w - 1 - t);
        const uint32_t row = (uint32_t) (((p % (llama_pos) w) + w) % w);
        std::memcpy(out.data() + (size_t) t*n_embd_q, raw.data() + (size_t) row*n_embd_q, n_embd_q*sizeof(float));
    }
}

void rkv_engine::read_keys(uint32_t strm, uint32_t layer, const std::vector<uint32_t> & order, std::vector<float> & out) const {
    const ggml_tensor * k = kv.layers[layer].k;
    const int64_t n_embd = kv.hparams.n_embd_k_gqa(kv.layers[layer].il);
    const size_t row_bytes = k->nb[1];

    std::vector<uint8_t> raw((size_t) kv.get_size()*row_bytes);
    ggml_backend_tensor_get(k, raw.data(), strm*k->nb[2], raw.size());

    const auto * traits = ggml_get_type_traits(k->type);
    out.resize(order.size()*n_embd);
    for (size_t i = 0; i < order.size(); ++i) {
        const uint8_t * src = raw.data() + (size_t) order[i]*row_bytes;
        float * dst = out.data() + i*n_embd;
        if (k->type == GGML_TYPE_F32) {
            std::memcpy(dst, src, n_embd*sizeof(float));
        } else {
            traits->to_float(src, dst, n_embd);
        }
    }
}

uint32_t rkv_engine::n_protected(uint32_t strm) const {
    const auto & st = streams[strm];
    if (st.pos_compact >= 0) {
        return st.n_keep; // a prompt that grew after a compression is compressible past the kept part
    }
    if (st.pos_keep <= 0) {
        return 0;
    }
    const auto & cells = kv.v_cells[strm];
    uint32_t n = 0;
    for (uint32_t i = 0; i < cells.size(); ++i) {
        n += !cells.is_empty(i) && cells.pos_get(i) < st.pos_keep;
    }
    return n;
}

bool rkv_engine::fail(uint32_t strm, const std::string & why) {
    LLAMA_LOG_ERROR("%s: stream %u: %s\n", __func__, strm, why.c_str());
    streams[strm].failure = why;
    return false;
}

rkv_engine::compress_status rkv_engine::compress(uint32_t strm, llama_context * lctx) {
    auto & st = streams[strm];
    st.pending = false;
    if (st.broken) {
        return RKV_COMPRESS_FAILED; // already said why; cleared, the sequence starts afresh
    }
    st.failure.clear();

    // the kept prompt leads the time order; the rest is scored as if it were the whole sequence
    const std::vector<uint32_t> all = cells_in_order(strm);
    const uint32_t n_keep = std::min<uint32_t>(n_protected(strm), (uint32_t) all.size());
    const std::vector<uint32_t> order(all.begin() + n_keep, all.end());
    const uint32_t n = (uint32_t) order.size();
    const uint32_t budget = (uint32_t) params.budget;
    const uint32_t window = (uint32_t) params.window;
    if (n <= budget) {
        return RKV_COMPRESS_NOTHING_TO_DO;
    }

    const auto t_start = std::chrono::steady_clock::now();

    // the previous graph may still be writing K/V and the rings
    lctx->synchronize();

    auto & cells = kv.v_cells[strm];
    const llama_seq_id seq_id = cells.seq_get(order.back());
    const uint32_t n_compact = budget - window;
    if (observer) {
        observer(observer_data, seq_id, 0);
    }

    std::vector<std::vector<int32_t>> kept;
    if (!run_scoring_graphs(strm, lctx, order, kept, st.profile)) {
        st.n_failed += 1;
        return RKV_COMPRESS_FAILED; // nothing changed yet
    }

    // every layer and head: the kept prompt, then its own kept tokens, then the window
    const uint32_t n_dst = n_keep + budget;
    std::vector<int32_t> src;
    std::vector<llama_pos> new_slot_pos;
    for (uint32_t l = 0; l < n_layer(); ++l) {
        const uint32_t n_head_kv = kv.hparams.n_head_kv(kv.layers[l].il);
        for (uint32_t h = 0; h < n_head_kv; ++h) {
            const auto & k = kept[(size_t) l*n_head_kv + h];
            src.insert(src.end(), all.begin(), all.begin() + n_keep);
            for (uint32_t j = 0; j < budget; ++j) {
                src.push_back((int32_t) order[k[j]]);
            }
            for (uint32_t j = 0; j < n_compact; ++j) {
                new_slot_pos.push_back(true_pos(strm, l, h, order[k[j]]));
            }
        }
    }
    uint32_t n_moved = 0;
    if (!run_compaction_graphs(strm, lctx, src, n_dst, st.profile, n_moved)) {
        if (n_moved > 0) {
            // some layers hold the new layout and the cells describe the old one: neither is the
            // sequence any more, so it goes (from every cache of the memory) and stays refused until
            // its owner clears it, rather than be decoded against a mix
            const std::string why = st.failure + "; layers below " + std::to_string(kv.layers[n_moved - 1].il + 1) +
                                    " had moved, so the sequence was cleared";
            llama_memory_seq_rm(llama_get_memory(lctx), seq_id, -1, -1);
            fail(strm, why);
            st.broken = true;
        }
        st.n_failed += 1;
        return RKV_COMPRESS_FAILED;
    }

    // kept prompt and window cells keep their true positions; compacted cells all sit just before the window
    std::vector<llama_pos> keep_pos(n_keep), window_pos(window);
    for (uint32_t j = 0; j < n_keep; ++j) {
        keep_pos[j] = cells.pos_get(all[j]);
    }
    for (uint32_t t = 0; t < window; ++t) {
        window_pos[t] = cells.pos_get(order[n - window + t]);
    }
    const llama_pos pos_compact = window_pos[0] - 1;

    for (uint32_t cell : all) {
        cells.rm(cell);
    }
    for (uint32_t j = 0; j < n_dst; ++j) {
        cells.pos_set(j, j < n_keep ? keep_pos[j] : j < n_keep + n_compact ? pos_compact : window_pos[j - n_keep - n_compact]);
        cells.seq_add(j, seq_id);
    }
    kv.v_heads[strm] = n_dst;

    st.pos_compact = pos_compact;
    st.pos_scored  = window_pos.back();
    st.n_keep      = n_keep;
    st.n_compact   = n_compact;
    st.slot_pos    = std::move(new_slot_pos);
    st.n_compressions += 1;
    st.n_evicted      += n - budget;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    st.compress_seconds += seconds;
    st.profile.total_seconds += seconds;

    if (observer) {
        observer(observer_data, seq_id, 1);
    }
    LLAMA_LOG_DEBUG("%s: stream %u: %u + %u -> %u + %u cells, P_c = %d\n", __func__, strm, n_keep, n, n_keep, budget, pos_compact);
    return RKV_COMPRESS_DONE;
}

size_t rkv_engine::cell_bytes(const llama_kv_cache & cache) {
    size_t bytes = 0;
    for (const auto & layer : cache.layers) {
        bytes += ggml_row_size(layer.k->type, cache.hparams.n_embd_k_gqa(layer.il));
        if (layer.v) {
            bytes += ggml_row_size(layer.v->type, cache.hparams.n_embd_v_gqa(layer.il));
        }
    }
    return bytes;
}

void rkv_engine::fill_stats(llama_seq_id seq_id, rkv_seq_stats & out) const {
    const uint32_t strm = stream_of(seq_id);
    const auto & st = streams[strm];
    const auto & cells = kv.v_cells[strm];

    const size_t bytes_per_cell = cell_bytes(kv);

    const llama_pos pos_max = cells.seq_pos_max(seq_id);
    out.n_compressions   = st.n_compressions;
    out.n_failed         = st.n_failed;
    out.n_evicted        = st.n_evicted;
    out.cells_used       = cells.get_used();
    out.cells_peak       = std::max<int64_t>(st.cells_peak, out.cells_used);
    out.kv_bytes_used    = (int64_t) (out.cells_used*bytes_per_cell);
    out.n_tokens         = pos_max + 1;
    out.kv_bytes_full    = (int64_t) (out.n_tokens*bytes_per_cell);
    out.pos_compacted    = st.pos_compact;
    out.compress_seconds = st.compress_seconds;
    out.compute_buffer_bytes = (int64_t) compute_buffer_bytes;
    out.cells_kept           = n_protected(strm);
    out.paused               = st.paused;
    out.kv_bytes_window      = 0;
    out.cells_window         = 0;
    if (swa) {
        out.cells_window    = swa->v_cells[strm].get_used();
        out.kv_bytes_window = (int64_t) (out.cells_window*cell_bytes(*swa));
    }
}

//
// hooks
//

bool rkv_engine::batch_fits(const llama_batch_allocr & balloc) {
    const llama_batch & batch = balloc.get_batch();
    std::vector<uint32_t> n_new(kv.n_stream, 0);
    for (int32_t i = 0; i < batch.n_tokens; ++i) {
        std::vector<bool> seen(kv.n_stream, false);
        for (int32_t k = 0; k < batch.n_seq_id[i]; ++k) {
            const uint32_t strm = stream_of(batch.seq_id[i][k]);
            if (!seen[strm]) {
                seen[strm] = true;
                n_new[strm]++;
            }
        }
    }

    bool fits = true;
    for (uint32_t s = 0; s < kv.n_stream; ++s) {
        if (n_new[s] == 0) {
            continue;
        }
        // paused: the cache grows while it has room, then compresses as usual
        const uint32_t limit = streams[s].paused ? kv.get_size() : n_protected(s) + (uint32_t) (params.budget + params.buffer);
        if (n_new[s] > (uint32_t) params.buffer) {
            LLAMA_LOG_ERROR("%s: a decode call carries %u tokens of one sequence, but with KV compression at most "
                            "buffer = %d fit between two compressions; split the batch\n", __func__, n_new[s], params.buffer);
            return false;
        }
        if (streams[s].broken) {
            LLAMA_LOG_ERROR("%s: stream %u: %s; clear the sequence and evaluate it again\n", __func__, s,
                            streams[s].failure.c_str());
            return false;
        }
        const uint32_t used = kv.v_cells[s].get_used();
        if (used + n_new[s] > limit) {
            streams[s].pending = true;
            fits = false;
        } else {
            streams[s].cells_peak = std::max<int64_t>(streams[s].cells_peak, used + n_new[s]);
        }
    }
    return fits;
}

bool rkv_engine_has_pending(const rkv_engine & eng) {
    for (const auto & st : eng.streams) {
        if (st.pending) {
            return true;
        }
    }
    return false;
}

bool rkv_engine_update(rkv_engine & eng, llama_context * lctx) {
    bool any = false;
    for (uint32_t s = 0; s < eng.streams.size(); ++s) {
        if (eng.streams[s].pending) {
            any = eng.compress(s, lctx) == rkv_engine::RKV_COMPRESS_DONE || any;
        }
    }
    return any;
}

bool rkv_engine::window_holds(uint32_t strm, llama_seq_id seq_id, llama_pos pos) const {
    // the window of a token at `pos` is every older position llama.cpp's mask leaves open to it
    const llama_pos lo = std::max<llama_pos>(0, pos - (llama_pos) swa->n_swa + 1);
    const auto & cells = swa->v_cells[strm];
    std::vector<bool> held(pos - lo, false);
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i) && cells.seq_has(i, seq_id)) {
            const llama_pos p = cells.pos_get(i);
            if (p >= lo && p < pos) {
                held[p - lo] = true;
            }
        }
    }
    return std::all_of(held.begin(), held.end(), [](bool h) { return h; });
}

rkv_engine::seq_rm_verdict rkv_engine::stream_seq_rm(uint32_t strm, llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    const auto & st = streams[strm];
    const llama_seq_id seq = seq_id >= 0 ? seq_id : (llama_seq_id) strm; // one sequence per stream (check)
    const llama_pos pos_max = kv.v_cells[strm].seq_pos_max(seq);
    if (p0 <= 0 && p1 > pos_max) {
        return RKV_SEQ_RM_CLEARS;
    }
    // the window layers have dropped what is older than their window: a truncation whose next token
    // would attend to dropped tokens there is refused, as one into the compressed part is (a fresh
    // evaluation of the prompt is what gives the same cache)
    if (swa && p0 <= pos_max && p1 > pos_max && !window_holds(strm, seq, p0)) {
        return RKV_SEQ_RM_REFUSED;
    }
    // a truncation above the last compression leaves what a fresh run of the same tokens would hold
    if (st.pos_compact < 0 || p0 > st.pos_scored) {
        return RKV_SEQ_RM_ALLOWED;
    }
    // so does one back into (or to the end of) the kept prompt that drops everything after it: the
    // kept cells hold the prompt as it was evaluated
    if (p1 > pos_max && p0 <= kept_prompt_end(strm)) {
        return RKV_SEQ_RM_UNCOMPRESSES;
    }
    return RKV_SEQ_RM_REFUSED;
}

llama_pos rkv_engine::kept_prompt_end(uint32_t strm) const {
    const auto & st = streams[strm];
    return st.n_keep == 0 ? 0 : kv.v_cells[strm].pos_get(st.n_keep - 1) + 1;
}

bool rkv_engine::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    const uint32_t s0 = seq_id >= 0 ? stream_of(seq_id) : 0;
    const uint32_t s1 = seq_id >= 0 ? s0 + 1 : (uint32_t) streams.size();
    // any sequence: all streams must agree before anything changes
    for (uint32_t s = s0; s < s1; ++s) {
        if (stream_seq_rm(s, seq_id, p0, p1) == RKV_SEQ_RM_REFUSED) {
            return false;
        }
    }
    for (uint32_t s = s0; s < s1; ++s) {
        switch (stream_seq_rm(s, seq_id, p0, p1)) {
            case RKV_SEQ_RM_CLEARS:
                streams[s].restart(); // the whole sequence goes: the stream starts afresh
                break;
            case RKV_SEQ_RM_UNCOMPRESSES: {
                // what remains is the prompt's plain cells [0, n_keep); the statistics go on
                auto & st = streams[s];
                st.pos_compact = st.pos_scored = -1;
                st.n_keep = st.n_compact = 0;
                st.slot_pos.clear();
                break;
            }
            default:
                break;
        }
    }
    return true;
}

bool rkv_engine::seq_shift(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    GGML_UNUSED(p0);
    GGML_UNUSED(p1);
    if (streams[stream_of(seq_id)].pos_compact >= 0) {
        LLAMA_LOG_WARN("%s: positions of a compressed sequence cannot be shifted or divided; ignored\n", __func__);
        return false;
    }
    return true;
}

void rkv_engine_clear(rkv_engine & eng) {
    for (auto & st : eng.streams) {
        st.restart();
    }
}

static rkv_engine * rkv_engine_of_mctx(const llama_kv_cache_context * mctx) {
    if (!mctx || !mctx->get_kv()) {
        return nullptr;
    }
    return mctx->get_kv()->rkv.get();
}

ggml_tensor * rkv_build_input_q_idxs(ggml_context * ctx, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch) {
    if (!rkv_engine_of_mctx(mctx)) {
        return nullptr;
    }
    ggml_tensor * idxs = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, ubatch.n_tokens);
    ggml_set_input(idxs);
    return idxs;
}

void rkv_set_input_q_idxs(const llama_kv_cache_context * mctx, ggml_tensor * dst, const llama_ubatch * ubatch) {
    const rkv_engine * eng = rkv_engine_of_mctx(mctx);
    GGML_ASSERT(eng && ggml_backend_buffer_is_host(dst->buffer));
    int64_t * data = (int64_t *) dst->data;
    const llama_pos w = eng->params.window;

    // only the last `window` tokens of each sequence in the ubatch reach the ring
    std::map<llama_seq_id, llama_pos> pos_max;
    for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
        const llama_seq_id s = ubatch->seq_id[i][0];
        const auto it = pos_max.find(s);
        pos_max[s] = it == pos_max.end() ? ubatch->pos[i] : std::max(it->second, ubatch->pos[i]);
    }
    for (uint32_t i = 0; i < ubatch->n_tokens; ++i) {
        const llama_seq_id s = ubatch->seq_id[i][0];
        const llama_pos p = ubatch->pos[i];
        data[i] = p > pos_max[s] - w ? (int64_t) eng->stream_of(s)*w + p % w : eng->trash_row();
    }
}

bool rkv_can_reuse_q_idxs(const llama_kv_cache_context * mctx, const ggml_tensor * q_idxs, const llama_ubatch & ubatch) {
    if (!rkv_engine_of_mctx(mctx)) {
        return q_idxs == nullptr;
    }
    return q_idxs && q_idxs->ne[0] == ubatch.n_tokens;
}

ggml_tensor * rkv_capture_query(ggml_context * ctx, const llama_kv_cache_context * mctx, ggml_tensor * q_cur,
                                ggml_tensor * q_idxs, float kq_scale, int il) {
    rkv_engine * eng = rkv_engine_of_mctx(mctx);
    GGML_ASSERT(eng);
    const int32_t l = eng->kv_layer(il);
    GGML_ASSERT(l >= 0);
    eng->kq_scale[l] = kq_scale;

    ggml_tensor * q = ggml_is_contiguous(q_cur) ? q_cur : ggml_cont(ctx, q_cur);
    if (q->type != GGML_TYPE_F32) {
        q = ggml_cast(ctx, q, GGML_TYPE_F32);
    }
    q = ggml_reshape_2d(ctx, q, q->ne[0]*q->ne[1], q->ne[2]);
    return ggml_set_rows(ctx, eng->rings[l], q, q_idxs);
}

//
// hooks called from the patched llama.cpp sources
//

bool rkv_engine_batch_fits(rkv_engine & eng, const llama_batch_allocr & balloc) {
    return eng.batch_fits(balloc);
}

bool rkv_engine_seq_rm(rkv_engine & eng, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    return eng.seq_rm(seq_id, p0, p1);
}

bool rkv_engine_seq_shift(rkv_engine & eng, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    return eng.seq_shift(seq_id, p0, p1);
}

void rkv_engine::stream_cp(uint32_t strm_src, uint32_t strm_dst) {
    streams[strm_dst] = streams[strm_src];
    streams[strm_dst].pending = false;
    for (ggml_tensor * ring : rings) {
        std::vector<uint8_t> rows((size_t) params.window*ring->nb[1]);
        ggml_backend_tensor_get(ring, rows.data(), (size_t) strm_src*params.window*ring->nb[1], rows.size());
        ggml_backend_tensor_set(ring, rows.data(), (size_t) strm_dst*params.window*ring->nb[1], rows.size());
    }
}

void rkv_engine_stream_cp(rkv_engine & eng, uint32_t strm_src, uint32_t strm_dst) {
    eng.stream_cp(strm_src, strm_dst);
}

void rkv_engine_state_write(const rkv_engine & eng, llama_io_write_i & io, llama_seq_id seq_id) {
    eng.state_write(io, seq_id);
}

void rkv_engine_state_read(rkv_engine & eng, llama_io_read_i & io, llama_seq_id seq_id) {
    eng.state_read(io, seq_id);
}
