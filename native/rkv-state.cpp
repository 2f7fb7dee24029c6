// The engine's saved state (llama_state_* calls): per stream, the compaction bookkeeping and the
// query ring, behind a magic number and the settings the data depends on.
#include "rkv-engine.h"

#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"

#include "ggml-backend.h"

#include <array>
#include <cmath>
#include <stdexcept>
#include <vector>

static constexpr uint32_t RKV_STATE_MAGIC    = 0x34564b52; // "RKV4": + the kept prompt and the pause
static constexpr uint32_t RKV_STATE_MAGIC_V3 = 0x33564b52; // "RKV3"
static constexpr uint32_t RKV_STATE_MAGIC_V2 = 0x32564b52; // "RKV2"

// the settings that shape the saved data: a state only makes sense under the same ones
static std::array<int32_t, 3> rkv_state_settings(const rkv_params & params) {
    return { params.budget, params.buffer, params.window };
}

void rkv_engine::state_write(llama_io_write_i & io, llama_seq_id seq_id) const {
    io.write(&RKV_STATE_MAGIC, sizeof(RKV_STATE_MAGIC));
    const auto settings = rkv_state_settings(params);
    io.write(settings.data(), sizeof(settings));
    // the scale the attention graph recorded: a context restored from this state may compress before
    // it builds one, and some models (Gemma 3) scale the queries themselves and pass 1
    io.write(kq_scale.data(), kq_scale.size()*sizeof(float));
    const uint32_t s0 = seq_id < 0 ? 0 : stream_of(seq_id);
    const uint32_t s1 = seq_id < 0 ? kv.n_stream : s0 + 1;
    for (uint32_t s = s0; s < s1; ++s) {
        const auto & st = streams[s];
        const uint32_t n_slot_pos = (uint32_t) st.slot_pos.size();
        io.write(&st.pos_compact, sizeof(st.pos_compact));
        io.write(&st.pos_scored, sizeof(st.pos_scored));
        io.write(&st.n_compact, sizeof(st.n_compact));
        io.write(&st.n_keep, sizeof(st.n_keep));
        io.write(&st.pos_keep, sizeof(st.pos_keep));
        const uint8_t paused = st.paused;
        io.write(&paused, sizeof(paused));
        io.write(&st.n_compressions, sizeof(st.n_compressions));
        io.write(&st.n_evicted, sizeof(st.n_evicted));
        io.write(&st.cells_peak, sizeof(st.cells_peak));
        io.write(&n_slot_pos, sizeof(n_slot_pos));
        if (n_slot_pos > 0) { // data() of an empty vector may be null: memcpy's arguments must not be
            io.write(st.slot_pos.data(), n_slot_pos*sizeof(llama_pos));
        }
        for (const ggml_tensor * ring : rings) {
            std::vector<float> rows((size_t) ring->ne[0]*params.window);
            ggml_backend_tensor_get(ring, rows.data(), (size_t) s*params.window*ring->nb[1], rows.size()*sizeof(float));
            io.write(rows.data(), rows.size()*sizeof(float));
        }
    }
}

void rkv_engine::state_read(llama_io_read_i & io, llama_seq_id seq_id) {
    uint32_t magic = 0;
    io.read(&magic, sizeof(magic));
    if (magic == RKV_STATE_MAGIC_V2 || magic == RKV_STATE_MAGIC_V3) {
        throw std::runtime_error(format("the saved state was written by an older rkv-local (format RKV%c): evaluate "
                                        "the prompt again", (char) (magic >> 24)));
    }
    if (magic != RKV_STATE_MAGIC) {
        throw std::runtime_error("the saved state carries no KV-compression data: restore it into a context with the same compression settings");
    }
    std::array<int32_t, 3> saved = {};
    io.read(saved.data(), sizeof(saved));
    if (saved != rkv_state_settings(params)) {
        throw std::runtime_error(format(
            "the saved state was compressed with budget %d, buffer %d, window %d; this context has budget %d, buffer %d, window %d",
            saved[0], saved[1], saved[2], params.budget, params.buffer, params.window));
    }
    std::vector<float> saved_scale(kq_scale.size());
    io.read(saved_scale.data(), saved_scale.size()*sizeof(float));
    for (const float f : saved_scale) {
        if (!(f > 0.0f && std::isfinite(f))) {
            throw std::runtime_error(format("corrupt KV-compression state: attention scale %g", f));
        }
    }
    const uint32_t s0 = seq_id < 0 ? 0 : stream_of(seq_id);
    const uint32_t s1 = seq_id < 0 ? kv.n_stream : s0 + 1;
    size_t n_heads = 0; // KV heads over all layers: slot positions come in rows of n_compact per head
    for (uint32_t l = 0; l < n_layer(); ++l) {
        n_heads += n_head_kv(l);
    }
    for (uint32_t s = s0; s < s1; ++s) {
        // read into a copy: a corrupt state must not leave a stream half restored
        rkv_stream_state st;
        uint32_t n_slot_pos = 0;
        io.read(&st.pos_compact, sizeof(st.pos_compact));
        io.read(&st.pos_scored, sizeof(st.pos_scored));
        io.read(&st.n_compact, sizeof(st.n_compact));
        io.read(&st.n_keep, sizeof(st.n_keep));
        io.read(&st.pos_keep, sizeof(st.pos_keep));
        uint8_t paused = 0;
        io.read(&paused, sizeof(paused));
        st.paused = paused != 0;
        io.read(&st.n_compressions, sizeof(st.n_compressions));
        io.read(&st.n_evicted, sizeof(st.n_evicted));
        io.read(&st.cells_peak, sizeof(st.cells_peak));
        io.read(&n_slot_pos, sizeof(n_slot_pos));
        const auto & cells = kv.v_cells[s];
        const llama_seq_id seq = seq_id >= 0 ? seq_id : (llama_seq_id) s; // one sequence per stream
        const bool compacted = st.pos_compact >= 0;
        if (st.n_compact != (compacted ? (uint32_t) (params.budget - params.window) : 0) ||
            (!compacted && st.n_keep != 0) || st.n_keep > cells.size() || st.pos_keep < 0 || paused > 1 ||
            (size_t) n_slot_pos != n_heads*st.n_compact || st.pos_scored < st.pos_compact ||
            st.cells_peak > cells.size() || (compacted && cells.seq_pos_max(seq) < st.pos_scored)) {
            throw std::runtime_error(format(
                "corrupt KV-compression state: %u compacted and %u kept cells, %u slot positions for %zu KV heads, positions %d..%d",
                st.n_compact, st.n_keep, n_slot_pos, n_heads, st.pos_compact, st.pos_scored));
        }
        st.slot_pos.resize(n_slot_pos);
        if (n_slot_pos > 0) {
            io.read(st.slot_pos.data(), n_slot_pos*sizeof(llama_pos));
        }
        for (const llama_pos pos : st.slot_pos) {
            if (pos < 0 || pos > st.pos_compact) {
                throw std::runtime_error(format("corrupt KV-compression state: a compacted cell at position %d, "
                                                "compaction at %d", pos, st.pos_compact));
            }
        }
        for (ggml_tensor * ring : rings) {
            std::vector<float> rows((size_t) ring->ne[0]*params.window);
            io.read(rows.data(), rows.size()*sizeof(float));
            ggml_backend_tensor_set(ring, rows.data(), (size_t) s*params.window*ring->nb[1], rows.size()*sizeof(float));
        }
        st.compress_seconds = streams[s].compress_seconds; // time this context spent, not the state's
        st.profile          = streams[s].profile;
        streams[s] = std::move(st);
    }
    kq_scale = std::move(saved_scale);
}
