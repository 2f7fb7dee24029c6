// Entry points of the rkv-local engine called from the patched llama.cpp sources (patches/).
// Each hook is only reached when compression is enabled on the cache, except rkv_window_cache_size.
#pragma once

#include "llama.h"

struct ggml_context;
struct ggml_tensor;
struct llama_context;
struct llama_ubatch;
struct rkv_engine;
class  llama_batch_allocr;
class  llama_io_read_i;
class  llama_io_write_i;
class  llama_kv_cache_context;

// cells per stream of a sliding-window cache: llama.cpp's choice, or at least size_window (the window
// and one ubatch, padded) while rkv_set_window_cache_for_budget is on for the creating thread
uint32_t rkv_window_cache_size(uint32_t size_llama, uint32_t size_window);

// memory-update path
bool rkv_engine_batch_fits (rkv_engine & eng, const llama_batch_allocr & balloc);
bool rkv_engine_has_pending(const rkv_engine & eng);
bool rkv_engine_update     (rkv_engine & eng, llama_context * lctx);

// cell metadata guards: false refuses the edit
bool rkv_engine_seq_rm   (rkv_engine & eng, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
bool rkv_engine_seq_shift(rkv_engine & eng, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void rkv_engine_clear    (rkv_engine & eng);
void rkv_engine_stream_cp(rkv_engine & eng, uint32_t strm_src, uint32_t strm_dst); // with seq_cp's deferred buffer copy

void rkv_engine_state_write(const rkv_engine & eng, llama_io_write_i & io, llama_seq_id seq_id);
void rkv_engine_state_read (rkv_engine & eng, llama_io_read_i  & io, llama_seq_id seq_id);

// query-window capture in the attention graph (null input when compression is off)
ggml_tensor * rkv_build_input_q_idxs(ggml_context * ctx, const llama_kv_cache_context * mctx, const llama_ubatch & ubatch);
void          rkv_set_input_q_idxs  (const llama_kv_cache_context * mctx, ggml_tensor * dst, const llama_ubatch * ubatch);
bool          rkv_can_reuse_q_idxs  (const llama_kv_cache_context * mctx, const ggml_tensor * q_idxs, const llama_ubatch & ubatch);
ggml_tensor * rkv_capture_query     (ggml_context * ctx, const llama_kv_cache_context * mctx, ggml_tensor * q_cur,
                                     ggml_tensor * q_idxs, float kq_scale, int il);
