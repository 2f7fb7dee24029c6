// The rkv-local engine attached to one llama_kv_cache: query rings, per-stream state,
// compaction. A friend of llama_kv_cache (see patches/), so it reads the cells and tensors directly.
#pragma once

#include "rkv.h"
#include "rkv-hooks.h"

#include "ggml-cpp.h"

#include <string>
#include <vector>

class llama_kv_cache;
struct rkv_scoring;      // rkv-graph.cpp
struct rkv_group_scores;
struct rkv_clock;

// the RoPE llama.cpp applies in model layer il (rkv-triattention.cpp); false with `why` if it has none we support
bool rkv_layer_rope(const llama_context & lctx, int32_t il, rkv_rope & out, std::vector<float> & freq_factors,
                    std::string & why);

struct rkv_stream_state {
    bool      pending     = false; // compress at the next memory update
    llama_pos pos_compact = -1;    // P_c, the position of every compacted cell; -1 while uncompressed
    llama_pos pos_scored  = -1;    // the newest position the last compression saw: what it kept depends on
                                   // everything up to here, so a truncation may not reach it
    uint32_t  n_keep      = 0;     // cells [0, n_keep) hold the kept prompt, at their true positions
    uint32_t  n_compact   = 0;     // cells [n_keep, n_keep + n_compact) hold a different token per head

    // true positions of the compacted cells: [n_layer][n_head_kv][n_compact]
    std::vector<llama_pos> slot_pos;

    // set from outside (rkv_set_kept_prompt, rkv_set_paused); saved with the state
    llama_pos pos_keep = 0;        // tokens below this position, evaluated before the first compression,
                                   // are never evicted (the prompt); the budget applies to the rest
    bool      paused   = false;    // no compression while the cache has room (thinking-only compression)

    // why the last compression failed (empty: it did not)
    std::string failure;
    // a compaction failed after some layers had moved: the sequence was cleared and no decode is
    // accepted until it is cleared again (rkv_get_failure says so; nothing reads a half-moved cache)
    bool        broken = false;

    // an empty sequence: everything but the settings above starts afresh
    void restart() {
        rkv_stream_state fresh;
        fresh.pos_keep = pos_keep;
        fresh.paused   = paused;
        *this = std::move(fresh);
    }

    int64_t n_compressions   = 0;
    int64_t n_failed         = 0; // compressions that failed
    int64_t n_evicted        = 0;
    int64_t cells_peak       = 0;
    double  compress_seconds = 0.0;
    rkv_profile profile = {};       // time per phase, summed over compressions
};

struct rkv_engine {
    // kv: the cache to compress; swa: with an interleaved sliding-window (iSWA) memory, its window
    // cache, which llama.cpp bounds itself and the engine only reads (null otherwise)
    rkv_engine(llama_kv_cache & kv, const llama_kv_cache * swa, const rkv_params & params);

    // empty when the cache can be compressed with these parameters, else the reason
    static std::string check(const llama_kv_cache & kv, const llama_context & lctx, const rkv_params & params);

    llama_kv_cache & kv;
    const llama_kv_cache * swa;
    const rkv_params params;

    // attention-sink logits (gpt-oss) per KV-cache layer, reduced to the max over each query group as
    // the importance reduces the logits: [n_head_kv], empty for a layer without sinks
    std::vector<std::vector<float>> sinks;

    // last `window` queries per stream and layer: F32 [n_embd_q, n_stream*window + 1], the extra row
    // takes the writes of older tokens of a ubatch
    // triattention (rkv-triattention.cpp), by KV-cache layer index: the layer's RoPE and calibration
    struct tri_layer {
        bool neox = false;
        std::vector<double> omega;   // angle per position of each rotated pair
        double mscale = 1.0;         // YaRN's magnitude
        std::vector<float> centres;  // [n_head][d]: mean pre-RoPE query (empty: not calibrated)
        std::vector<float> abs_means; // [n_head][d/2]: mean modulus of each pair
    };
    std::vector<tri_layer> tri;
    // fills `tri`'s RoPE part; empty when it succeeded, else why the model cannot use triattention
    std::string init_triattention(const llama_context & lctx);
    // per query head of a layer, for the next query position t: the mean over the future offsets of
    // the rotated centre, F32 [n_head][d], and the norm term's weights, F32 [n_head][d/2]
    void triattention_queries(uint32_t layer, llama_pos t, std::vector<float> & q_eff, std::vector<float> & w) const;

    std::vector<ggml_tensor *> rings; // by KV-cache layer index
    std::vector<float> kq_scale;      // recorded when the attention graph is built
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;

    std::vector<rkv_stream_state> streams;

    rkv_compression_observer observer = nullptr; // test hook (rkv_set_compression_observer)
    void * observer_data = nullptr;

    uint32_t n_layer() const { return (uint32_t) rings.size(); }
    int32_t  kv_layer(int32_t il) const; // model layer -> KV-cache layer, -1 if none
    bool     window_layer(int32_t il) const; // a layer of the sliding-window cache (not compressed)
    std::vector<int32_t> model_layers() const; // the model layers of the compressed cache, ascending
    uint32_t stream_of(llama_seq_id seq_id) const;
    uint32_t trash_row() const;

    // cells of a stream in time order: by position, ties (compacted cells) by index
    std::vector<uint32_t> cells_in_order(uint32_t strm) const;
    llama_pos true_pos(uint32_t strm, uint32_t layer, uint32_t head, uint32_t cell) const;

    // the window queries of a layer in time order: [window][n_embd_q]
    void read_queries(uint32_t strm, uint32_t layer, const std::vector<uint32_t> & order, std::vector<float> & out) const;
    // dequantized keys of the given cells: [order.size()][n_embd_k_gqa]
    void read_keys(uint32_t strm, uint32_t layer, const std::vector<uint32_t> & order, std::vector<float> & out) const;

    enum compress_status { RKV_COMPRESS_DONE, RKV_COMPRESS_NOTHING_TO_DO, RKV_COMPRESS_FAILED };
    // a failure leaves the cells and the K/V as they were, or, when some layers had moved, the
    // sequence cleared (and `broken`); streams[strm].failure says why
    compress_status compress(uint32_t strm, llama_context * lctx);
    // logs a failure of stream strm's compression and records why; false
    bool fail(uint32_t strm, const std::string & why);

    // cells of a stream that no compression may evict: the kept prompt (the leading cells in time order)
    uint32_t n_protected(uint32_t strm) const;

    // scores every layer of a stream on the backends (rkv-graph.cpp): the indices into `order` each
    // layer and head keeps, in time order, [layer*n_head_kv + head][budget]
    bool run_scoring_graphs(uint32_t strm, llama_context * lctx, const std::vector<uint32_t> & order,
                            std::vector<std::vector<int32_t>> & kept, rkv_profile & prof);
    // moves the cells of every layer and head, [layer][head][n_dst], to cells [0, n_dst) of the stream;
    // n_moved: the layers [0, n_moved) whose K/V may have changed (all of them on success)
    bool run_compaction_graphs(uint32_t strm, llama_context * lctx, const std::vector<int32_t> & cells,
                               int64_t n_dst, rkv_profile & prof, uint32_t & n_moved);

    // the phases of run_scoring_graphs: the inputs' host data; per group of layers [l0, l1) the
    // importance graph and the similarity graph (rkv), whose results the host then finishes
    bool scoring_begin(uint32_t strm, const std::vector<uint32_t> & order, rkv_scoring & sc, rkv_profile & prof);
    bool score_importance(uint32_t strm, llama_context * lctx, const rkv_scoring & sc, uint32_t l0, uint32_t l1,
                          rkv_group_scores & out, rkv_clock & clock, rkv_profile & prof);
    bool score_redundancy(uint32_t strm, llama_context * lctx, const rkv_scoring & sc, uint32_t l0, uint32_t l1,
                          rkv_group_scores & out, rkv_clock & clock, rkv_profile & prof);
    // the keys of a layer in a stream: [head_dim, kv_size, n_head_kv]
    ggml_tensor * key_view(ggml_context * ctx, uint32_t strm, uint32_t l) const;

    // how a layer's redundancy is computed (enum rkv_redundancy_path), from where its keys live
    int32_t redundancy_path(uint32_t layer) const;

    bool warned_host_scan = false; // the host's near-copy scan replaced a device kernel (said once)

    // host inputs of the portable similarity graph, kept between compressions of the same size
    std::vector<float> sim_bias, ramp;

    // the largest compute buffer the scheduler held after a compression
    size_t compute_buffer_bytes = 0;
    void note_compute_buffer(ggml_backend_sched_t sched);

    // with an iSWA memory: whether the window cache of a stream still holds every token the window
    // of a token at position `pos` attends to (a truncation to `pos` would otherwise lose them)
    bool window_holds(uint32_t strm, llama_seq_id seq_id, llama_pos pos) const;

    bool batch_fits(const llama_batch_allocr & balloc);
    bool seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    // UNCOMPRESSES: a truncation into the kept prompt drops every compressed cell
    enum seq_rm_verdict { RKV_SEQ_RM_REFUSED, RKV_SEQ_RM_ALLOWED, RKV_SEQ_RM_CLEARS, RKV_SEQ_RM_UNCOMPRESSES };
    // what removing [p0, p1) of a stream's sequence (seq_id -1: whichever it holds) would do
    seq_rm_verdict stream_seq_rm(uint32_t strm, llama_seq_id seq_id, llama_pos p0, llama_pos p1) const;
    // the position after the kept prompt's last cell (0 when none is kept)
    llama_pos kept_prompt_end(uint32_t strm) const;
    bool seq_shift(llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    void stream_cp(uint32_t strm_src, uint32_t strm_dst);
    void state_write(llama_io_write_i & io, llama_seq_id seq_id) const;
    void state_read(llama_io_read_i & io, llama_seq_id seq_id);

    uint32_t n_head_kv(uint32_t layer) const;

    // K+V bytes one cell of a cache takes over its layers
    static size_t cell_bytes(const llama_kv_cache & cache);
    void fill_stats(llama_seq_id seq_id, rkv_seq_stats & out) const;
};
