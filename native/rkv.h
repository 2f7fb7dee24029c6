// rkv-local: R-KV decode-time KV-cache compression for llama.cpp, public C API.
//
// Each sequence keeps at most `budget + buffer` KV cells. When a token needs a cell beyond
// that, every layer and KV head keeps its `budget` best tokens (scored by the chosen method)
// and the others are evicted. Bound from Python with ctypes (rkv_local/_native.py).
#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

enum rkv_method {
    RKV_METHOD_RKV          = 0, // importance (last `window` queries) minus key redundancy
    RKV_METHOD_SNAPKV       = 1, // importance only
    RKV_METHOD_H2O          = 2, // importance from the last query only, no pooling
    RKV_METHOD_STREAMINGLLM = 3, // the first `sink` tokens and the most recent ones
    RKV_METHOD_KEYDIFF      = 4, // the keys least similar (cosine) to the head's mean key; no queries
    RKV_METHOD_TRIATTENTION = 5, // the attention calibrated pre-RoPE query centres would pay over future
                                 // offsets, plus a norm term (rkv_set_query_stats); no queries
};

// Which kernels a compression uses. The portable graphs of stock ggml ops run on every backend (Metal
// and Vulkan always take them); the fused kernels do the same work without the n x n similarity matrix
// (each key's newest near-copy: CPU custom op, CUDA kernel) and move the kept K/V rows in place (CPU).
enum rkv_kernels {
    RKV_KERNELS_AUTO     = 0, // fused where the cache's backend has them, else portable
    RKV_KERNELS_PORTABLE = 1, // always the portable graphs (for comparisons and tests)
};

struct rkv_params {
    int32_t method;    // enum rkv_method
    int32_t budget;    // B: cells kept per layer and KV head after a compression
    int32_t buffer;    // b: cells decoded between two compressions
    int32_t window;    // alpha: most recent tokens, always kept; their queries score the others
    int32_t kernel;    // max-pooling kernel over neighbouring candidates (odd)
    int32_t sink;      // streamingllm: first tokens always kept
    float   lambda;    // rkv: weight of importance against redundancy
    float   threshold; // rkv: cosine similarity above which two keys are near-copies
    int32_t kernels;   // enum rkv_kernels
};

struct rkv_seq_stats {
    int64_t n_compressions;   // compressions of this sequence so far
    int64_t n_evicted;        // tokens evicted per layer and head, summed over compressions
    int64_t cells_used;       // cells the sequence holds now
    int64_t cells_peak;       // most cells the sequence held at once
    int64_t kv_bytes_used;    // K+V bytes of the cells in use, all layers
    int64_t kv_bytes_full;    // K+V bytes a full cache would hold for the same tokens
    int64_t n_tokens;         // logical length: last position + 1
    int64_t pos_compacted;    // position given to compacted cells (-1: never compressed)
    double  compress_seconds; // wall time spent compressing
    int64_t compute_buffer_bytes; // largest scheduler compute buffer seen after a compression (all backends)
    int64_t kv_bytes_window;  // sliding-window models: K+V bytes of the window cache's cells in use (llama.cpp
                              // bounds it; not compressed, not counted in kv_bytes_used/full); 0 otherwise
    int64_t cells_window;     // sliding-window models: cells the window cache holds now; 0 otherwise
    int64_t cells_kept;       // cells of the kept prompt (rkv_set_kept_prompt), never evicted
    int32_t paused;           // 1 while compression is paused (rkv_set_paused)
    int64_t n_failed;         // compressions that failed (rkv_get_failure says why the last one did)
};

// Where the time of a sequence's compressions went, summed over them (seconds).
struct rkv_profile {
    int64_t n_compressions;
    int32_t redundancy_path;    // of the last compression: enum rkv_redundancy_path
    int32_t fused_moves;        // of the last compression: 1 when the K/V rows moved in place on the CPU
    double  build_seconds;      // building and allocating the graphs, uploading their inputs
    double  importance_seconds; // computing the importance graphs (Q.K, softmax, mean, pooling)
    double  redundancy_seconds; // computing the redundancy graphs (+ the device kernel and its read-back)
    double  host_seconds;       // reading the scores back, finishing them, picking the kept tokens
    double  compaction_seconds; // computing the compaction graphs (get_rows/set_rows of K and V)
    double  total_seconds;      // the whole compression, cell bookkeeping included
};

enum rkv_redundancy_path {
    RKV_PATH_NONE     = 0, // the method has no redundancy term
    RKV_PATH_PORTABLE = 1, // the portable graph
    RKV_PATH_CPU      = 2, // the fused ggml custom op on the CPU backend
    RKV_PATH_CUDA     = 3, // the fused CUDA kernel
    RKV_PATH_HOST     = 4, // the fused scan on the host (a device kernel was not available)
};

LLAMA_API struct rkv_params rkv_params_default(void);

// Validates the parameters against the context and enables compression on its KV cache. With an
// interleaved sliding-window memory (gpt-oss, Gemma 3) the full-attention layers are compressed and
// the window layers keep llama.cpp's own window.
// Returns 0 on success; otherwise -1 and rkv_last_error() says why. Enable before decoding.
LLAMA_API int32_t rkv_enable(struct llama_context * ctx, const struct rkv_params * params);
LLAMA_API void    rkv_disable(struct llama_context * ctx);
LLAMA_API bool    rkv_is_enabled(const struct llama_context * ctx);

// The last error of rkv_* calls on this thread (empty string if none).
LLAMA_API const char * rkv_last_error(void);

// Compress a sequence now, whatever its size. Returns 1 if it was compressed, 0 if it holds
// no more than `budget` cells, -1 on error (a compression that failed: rkv_last_error() says why).
LLAMA_API int32_t rkv_compress(struct llama_context * ctx, llama_seq_id seq_id);

// Why the last compression of a sequence failed, automatic (a llama_decode that then returns 1) or
// forced; "" when it did not (or none ran); null on error. A failure leaves the sequence's cache as it
// was, or, when it failed while moving K/V (some layers moved, others not), clears the sequence and
// refuses its decodes until it is cleared again (llama_memory_seq_rm from position 0): its owner must
// evaluate it again. Valid until the next call on the context.
LLAMA_API const char * rkv_get_failure(const struct llama_context * ctx, llama_seq_id seq_id);

// Keep a sequence's first n_tokens positions whole (its prompt): they are never evicted, and the budget
// and buffer apply to the tokens after them (the sequence holds at most kept + budget + buffer cells).
// Tokens below n_tokens evaluated after the sequence's first compression are not kept (the kept part
// is what the cache held uncompressed then). A truncation into or to the end of the kept prompt drops
// every other cell and is allowed; the sequence is then uncompressed. 0 (the default) keeps nothing.
LLAMA_API int32_t rkv_set_kept_prompt(struct llama_context * ctx, llama_seq_id seq_id, llama_pos n_tokens);

// Pause a sequence's compression (thinking-only compression: the answer after the thinking is not
// evicted): the sequence grows while the cache has cells, and is compressed as usual when it has none.
LLAMA_API int32_t rkv_set_paused(struct llama_context * ctx, llama_seq_id seq_id, bool paused);

// Test hook: called by every compression, automatic (inside llama_decode) or forced, on the thread that
// runs it: with phase 0 before it scores (rkv_get_layer_inputs and rkv_get_kept_positions then show what
// it scores) and phase 1 once it compacted (rkv_get_kept_positions shows what it kept). Null removes it.
typedef void (*rkv_compression_observer)(void * user_data, llama_seq_id seq_id, int32_t phase);
LLAMA_API int32_t rkv_set_compression_observer(struct llama_context * ctx, rkv_compression_observer observer,
                                               void * user_data);

// Sliding-window models (Gemma 3, gpt-oss): llama.cpp gives the window cache min(n_ctx, n_swa + n_ubatch)
// cells per stream, and a budgeted context's n_ctx (budget + buffer) may be smaller than the window, which
// then does not fit: a decode fails once the window cache is full. While this is on, contexts created on
// the calling thread size their window cache for the window (n_swa + n_ubatch, padded to 256) whatever
// n_ctx is. Off by default: llama.cpp's own sizing.
LLAMA_API void rkv_set_window_cache_for_budget(bool on);

struct rkv_window_cache {
    int32_t n_swa;          // the window, in tokens
    int64_t cells;          // cells the window cache has per stream (allocated)
    int64_t cells_used;     // cells the sequence's stream holds now
    int64_t bytes_per_cell; // K+V bytes of one cell over the window layers
};

// The window cache of an interleaved sliding-window model, compressed or not. Returns 1 and fills out;
// 0 (out zeroed) when the model has none; -1 on error.
LLAMA_API int32_t rkv_get_window_cache(const struct llama_context * ctx, llama_seq_id seq_id, struct rkv_window_cache * out);

// The rotary position embedding of a model layer as llama.cpp applies it to queries and keys.
struct rkv_rope {
    int32_t n_rot;        // rotated dimensions (the head size for every model triattention accepts)
    int32_t neox;         // 1: pairs (i, i + n_rot/2); 0: pairs (2i, 2i + 1)
    float   freq_base;
    float   freq_scale;
    float   ext_factor;   // YaRN
    float   attn_factor;
    float   beta_fast;
    float   beta_slow;
    int32_t n_ctx_orig;
    int32_t n_freq_factors; // per-pair divisors of the frequencies (Llama 3 and LongRoPE models), 0: none
};

// The RoPE of model layer il (a layer of any context, compressed or not). freq_factors receives up to
// n_max of the layer's frequency factors. Returns 0, or -1 (a layer without RoPE, M-RoPE, ...).
LLAMA_API int32_t rkv_get_rope(const struct llama_context * ctx, int32_t il, struct rkv_rope * out,
                               float * freq_factors, int32_t n_max);

// triattention's calibration of compressed layer il: per query head, the mean pre-RoPE query
// (centres [n_head][head_dim]) and the mean modulus of each rotated pair (abs_means [n_head][head_dim/2]).
// Every compressed layer needs it before the first compression. Returns 0 or -1.
LLAMA_API int32_t rkv_set_query_stats(struct llama_context * ctx, int32_t il, const float * centres,
                                      const float * abs_means);

// K+V bytes one cell takes over all layers, for any plain KV cache (compressed or not); -1 if none.
// For an interleaved sliding-window model: over its full-attention layers (the cache that grows).
LLAMA_API int64_t rkv_kv_bytes_per_cell(const struct llama_context * ctx);

// The model layers whose cache is compressed (every attention layer, or the full-attention ones of
// a sliding-window model), ascending. Returns their count (at most n_max are written) or -1.
LLAMA_API int32_t rkv_get_layers(const struct llama_context * ctx, int32_t * out, int32_t n_max);

LLAMA_API int32_t rkv_get_stats(const struct llama_context * ctx, llama_seq_id seq_id, struct rkv_seq_stats * out);

LLAMA_API int32_t rkv_get_profile(const struct llama_context * ctx, llama_seq_id seq_id, struct rkv_profile * out);

// Positions of the tokens held by one layer and KV head, in time order (the order the next
// compression scores them in). Returns their count (at most n_max are written) or -1.
LLAMA_API int32_t rkv_get_kept_positions(
        const struct llama_context * ctx, llama_seq_id seq_id, int32_t il, int32_t head,
        llama_pos * out, int32_t n_max);

// What the next compression of a layer would score, for checks against the reference:
// the captured window queries [window][n_head*head_dim] (ring order) and the dequantized keys
// [n][n_head_kv*head_dim] in the same order as rkv_get_kept_positions. Returns n or -1.
LLAMA_API int32_t rkv_get_layer_inputs(
        const struct llama_context * ctx, llama_seq_id seq_id, int32_t il,
        float * queries, int32_t n_queries_max, float * keys, int32_t n_keys_max, float * kq_scale);

#ifdef __cplusplus
}
#endif
