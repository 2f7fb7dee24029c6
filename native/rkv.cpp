// The C API of native/rkv.h.
#include "rkv.h"

#include "rkv-engine.h"
#include "rkv-hooks.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-hybrid-iswa.h"
#include "llama-memory-recurrent.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <string>

static thread_local std::string rkv_error;

static int32_t rkv_fail(const std::string & msg) {
    rkv_error = msg;
    return -1;
}

// The cache the engine compresses: a plain KV cache, or the full-attention (base) cache of an
// interleaved sliding-window memory; null for any other memory.
static llama_kv_cache * rkv_cache_of(const llama_context * ctx, const llama_kv_cache ** swa = nullptr) {
    if (!ctx) {
        return nullptr;
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        if (swa) {
            *swa = iswa->get_swa();
        }
        return iswa->get_base();
    }
    return dynamic_cast<llama_kv_cache *>(mem);
}

static rkv_engine * rkv_engine_of_ctx(const llama_context * ctx) {
    llama_kv_cache * kv = rkv_cache_of(ctx);
    return kv ? kv->rkv.get() : nullptr;
}

static bool rkv_seq_ok(const rkv_engine * eng, llama_seq_id seq_id) {
    return seq_id >= 0 && (uint32_t) seq_id < eng->kv.get_n_seq_max();
}

// The engine of ctx when compression is on and seq_id (and il, unless -1) are valid; null with
// rkv_last_error() set otherwise. *layer receives the KV-cache layer of il.
static rkv_engine * rkv_checked(const llama_context * ctx, llama_seq_id seq_id, int32_t il = -1, int32_t * layer = nullptr) {
    rkv_error.clear();
    rkv_engine * eng = rkv_engine_of_ctx(ctx);
    if (!eng) {
        rkv_fail("compression is not enabled on this context");
        return nullptr;
    }
    if (!rkv_seq_ok(eng, seq_id)) {
        rkv_fail("invalid sequence id " + std::to_string(seq_id));
        return nullptr;
    }
    if (il >= 0 || layer) {
        const int32_t l = eng->kv_layer(il);
        if (l < 0) {
            rkv_fail("layer " + std::to_string(il) + (eng->window_layer(il)
                ? " is a sliding-window layer: llama.cpp keeps its last n_swa tokens, it is not compressed"
                : " has no KV cache"));
            return nullptr;
        }
        *layer = l;
    }
    return eng;
}

// why a memory that is not a plain KV cache cannot be compressed
static std::string rkv_unsupported_memory(const llama_memory_i * mem) {
    const char * kind = "this kind of model memory";
    if (!mem) {
        kind = "a context without memory (e.g. embeddings only)";
    } else if (dynamic_cast<const llama_memory_recurrent *>(mem)) {
        kind = "recurrent models (Mamba, RWKV, ...)";
    } else if (dynamic_cast<const llama_memory_hybrid *>(mem) || dynamic_cast<const llama_memory_hybrid_iswa *>(mem)) {
        kind = "hybrid attention + recurrent models";
    }
    return std::string("KV compression does not support ") + kind +
           ": it needs an attention KV cache (plain, or interleaved sliding-window)";
}

rkv_params rkv_params_default(void) {
    rkv_params p;
    p.method    = RKV_METHOD_RKV;
    p.budget    = 1024;
    p.buffer    = 128;
    p.window    = 8;
    p.kernel    = 7;
    p.sink      = 4;
    p.lambda    = 0.1f;
    p.threshold = 0.5f;
    p.kernels   = RKV_KERNELS_AUTO;
    return p;
}

const char * rkv_last_error(void) {
    return rkv_error.c_str();
}

int32_t rkv_enable(llama_context * ctx, const rkv_params * params) {
    rkv_error.clear();
    if (!ctx || !params) {
        return rkv_fail("null context or parameters");
    }
    const llama_kv_cache * swa = nullptr;
    llama_kv_cache * kv = rkv_cache_of(ctx, &swa);
    if (!kv) {
        return rkv_fail(rkv_unsupported_memory(llama_get_memory(ctx)));
    }
    const std::string why = rkv_engine::check(*kv, *ctx, *params);
    if (!why.empty()) {
        return rkv_fail(why);
    }
    for (uint32_t s = 0; s < kv->get_n_seq_max(); ++s) {
        if (kv->seq_pos_max((llama_seq_id) s) >= 0) {
            return rkv_fail("the cache already holds tokens: enable compression before decoding (or clear the cache)");
        }
    }
    std::shared_ptr<rkv_engine> eng;
    try {
        eng = std::make_shared<rkv_engine>(*kv, swa, *params);
    } catch (const std::exception & e) {
        return rkv_fail(e.what());
    }
    if (params->method == RKV_METHOD_TRIATTENTION) {
        const std::string tri_why = eng->init_triattention(*ctx);
        if (!tri_why.empty()) {
            return rkv_fail(tri_why);
        }
    }
    kv->rkv = std::move(eng);
    return 0;
}

void rkv_disable(llama_context * ctx) {
    llama_kv_cache * kv = rkv_cache_of(ctx);
    if (kv) {
        kv->rkv.reset();
    }
}

bool rkv_is_enabled(const llama_context * ctx) {
    return rkv_engine_of_ctx(ctx) != nullptr;
}

int32_t rkv_compress(llama_context * ctx, llama_seq_id seq_id) {
    rkv_engine * eng = rkv_checked(ctx, seq_id);
    if (!eng) {
        return -1;
    }
    auto & st = eng->streams[eng->stream_of(seq_id)];
    const int64_t before = st.n_compressions;
    st.pending = true;
    ctx->memory_update(false);
    if (!st.failure.empty()) {
        return rkv_fail(st.failure);
    }
    return st.n_compressions > before ? 1 : 0;
}

const char * rkv_get_failure(const llama_context * ctx, llama_seq_id seq_id) {
    const rkv_engine * eng = rkv_checked(ctx, seq_id);
    return eng ? eng->streams[eng->stream_of(seq_id)].failure.c_str() : nullptr;
}

int32_t rkv_set_kept_prompt(llama_context * ctx, llama_seq_id seq_id, llama_pos n_tokens) {
    rkv_engine * eng = rkv_checked(ctx, seq_id);
    if (!eng) {
        return -1;
    }
    if (n_tokens < 0) {
        return rkv_fail("a kept prompt of " + std::to_string(n_tokens) + " tokens");
    }
    eng->streams[eng->stream_of(seq_id)].pos_keep = n_tokens;
    return 0;
}

int32_t rkv_set_paused(llama_context * ctx, llama_seq_id seq_id, bool paused) {
    rkv_engine * eng = rkv_checked(ctx, seq_id);
    if (!eng) {
        return -1;
    }
    eng->streams[eng->stream_of(seq_id)].paused = paused;
    return 0;
}

int32_t rkv_set_compression_observer(llama_context * ctx, rkv_compression_observer observer, void * user_data) {
    rkv_engine * eng = rkv_checked(ctx, 0);
    if (!eng) {
        return -1;
    }
    eng->observer      = observer;
    eng->observer_data = user_data;
    return 0;
}

// contexts created on this thread size their window cache for the window (rkv_set_window_cache_for_budget)
static thread_local bool rkv_window_for_budget = false;

void rkv_set_window_cache_for_budget(bool on) {
    rkv_window_for_budget = on;
}

uint32_t rkv_window_cache_size(uint32_t size_llama, uint32_t size_window) {
    if (!rkv_window_for_budget) {
        return size_llama;
    }
    // padded as llama.cpp pads the window cache (ggml-org/llama.cpp#17037)
    return std::max(size_llama, (uint32_t) GGML_PAD(size_window, 256));
}

static int64_t cell_bytes_allocated(const llama_kv_cache & kv) {
    size_t total = 0;
    for (const auto & [buft, size] : kv.memory_breakdown()) {
        total += size;
    }
    return (int64_t) (total/((size_t) kv.get_size()*kv.get_n_stream()));
}

int32_t rkv_get_window_cache(const llama_context * ctx, llama_seq_id seq_id, rkv_window_cache * out) {
    rkv_error.clear();
    const llama_kv_cache * swa = nullptr;
    const llama_kv_cache * kv = rkv_cache_of(ctx, &swa);
    if (!kv || !out) {
        return rkv_fail("this model's memory is not a plain attention KV cache");
    }
    if (seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return rkv_fail("invalid sequence id " + std::to_string(seq_id));
    }
    *out = {};
    if (!swa) {
        return 0;
    }
    out->n_swa          = (int32_t) llama_model_n_swa(llama_get_model(ctx));
    out->cells          = swa->get_size();
    out->cells_used     = swa->get_cells(seq_id).get_used();
    out->bytes_per_cell = cell_bytes_allocated(*swa);
    return 1;
}

int64_t rkv_kv_bytes_per_cell(const llama_context * ctx) {
    const llama_kv_cache * kv = rkv_cache_of(ctx);
    if (!kv) {
        return rkv_fail("this model's memory is not a plain attention KV cache");
    }
    return cell_bytes_allocated(*kv);
}

int32_t rkv_get_rope(const llama_context * ctx, int32_t il, rkv_rope * out, float * freq_factors, int32_t n_max) {
    rkv_error.clear();
    if (!ctx || !out) {
        return rkv_fail("null context or output");
    }
    std::vector<float> factors;
    std::string why;
    if (!rkv_layer_rope(*ctx, il, *out, factors, why)) {
        return rkv_fail(why);
    }
    std::copy_n(factors.begin(), std::min<size_t>(factors.size(), (size_t) std::max(n_max, 0)), freq_factors);
    return 0;
}

int32_t rkv_set_query_stats(llama_context * ctx, int32_t il, const float * centres, const float * abs_means) {
    int32_t layer = -1;
    rkv_engine * eng = rkv_checked(ctx, 0, il, &layer);
    if (!eng) {
        return -1;
    }
    if (eng->params.method != RKV_METHOD_TRIATTENTION) {
        return rkv_fail("query statistics are triattention's; this context compresses with another method");
    }
    if (!centres || !abs_means) {
        return rkv_fail("null statistics");
    }
    const llama_hparams & hp = ctx->get_model().hparams;
    const int64_t d      = hp.n_embd_head_k(il);
    const int64_t n_head = hp.n_head(il);
    for (int64_t i = 0; i < n_head*d; ++i) {
        if (!std::isfinite(centres[i]) || (i < n_head*d/2 && !(std::isfinite(abs_means[i]) && abs_means[i] >= 0.0f))) {
            return rkv_fail("query statistics of layer " + std::to_string(il) + " are not finite (or a modulus is negative)");
        }
    }
    auto & tl = eng->tri[layer];
    tl.centres.assign(centres, centres + n_head*d);
    tl.abs_means.assign(abs_means, abs_means + n_head*d/2);
    return 0;
}

int32_t rkv_get_layers(const llama_context * ctx, int32_t * out, int32_t n_max) {
    const rkv_engine * eng = rkv_checked(ctx, 0);
    if (!eng) {
        return -1;
    }
    const std::vector<int32_t> layers = eng->model_layers();
    for (size_t i = 0; i < layers.size() && (int32_t) i < n_max; ++i) {
        out[i] = layers[i];
    }
    return (int32_t) layers.size();
}

int32_t rkv_get_stats(const llama_context * ctx, llama_seq_id seq_id, rkv_seq_stats * out) {
    const rkv_engine * eng = rkv_checked(ctx, seq_id);
    if (!eng || !out) {
        return -1;
    }
    eng->fill_stats(seq_id, *out);
    return 0;
}

int32_t rkv_get_profile(const llama_context * ctx, llama_seq_id seq_id, rkv_profile * out) {
    const rkv_engine * eng = rkv_checked(ctx, seq_id);
    if (!eng || !out) {
        return -1;
    }
    const auto & st = eng->streams[eng->stream_of(seq_id)];
    *out = st.profile;
    out->n_compressions = st.n_compressions;
    return 0;
}

int32_t rkv_get_kept_positions(const llama_context * ctx, llama_seq_id seq_id, int32_t il, int32_t head,
                               llama_pos * out, int32_t n_max) {
    int32_t l = -1;
    const rkv_engine * eng = rkv_checked(ctx, seq_id, il, &l);
    if (!eng) {
        return -1;
    }
    if (head < 0 || (uint32_t) head >= eng->n_head_kv(l)) {
        return rkv_fail("invalid KV head " + std::to_string(head));
    }
    const uint32_t strm = eng->stream_of(seq_id);
    const std::vector<uint32_t> order = eng->cells_in_order(strm);
    for (size_t i = 0; i < order.size() && (int32_t) i < n_max; ++i) {
        out[i] = eng->true_pos(strm, l, head, order[i]);
    }
    return (int32_t) order.size();
}

int32_t rkv_get_layer_inputs(const llama_context * ctx, llama_seq_id seq_id, int32_t il,
                             float * queries, int32_t n_queries_max, float * keys, int32_t n_keys_max, float * kq_scale) {
    int32_t l = -1;
    const rkv_engine * eng = rkv_checked(ctx, seq_id, il, &l);
    if (!eng) {
        return -1;
    }
    const_cast<llama_context *>(ctx)->synchronize();
    const uint32_t strm = eng->stream_of(seq_id);
    const std::vector<uint32_t> order = eng->cells_in_order(strm);
    if (order.empty()) {
        return 0;
    }
    std::vector<float> buf;
    eng->read_queries(strm, l, order, buf);
    std::memcpy(queries, buf.data(), std::min<size_t>(buf.size(), (size_t) std::max(n_queries_max, 0))*sizeof(float));
    eng->read_keys(strm, l, order, buf);
    std::memcpy(keys, buf.data(), std::min<size_t>(buf.size(), (size_t) std::max(n_keys_max, 0))*sizeof(float));
    if (kq_scale) {
        *kq_scale = eng->kq_scale[l];
    }
    return (int32_t) order.size();
}
