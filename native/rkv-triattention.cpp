// TriAttention's host side (rkv_local/reference.py): the RoPE of each layer as llama.cpp applies it,
// and the calibrated query centres rotated to the future positions the scores average over. The
// candidates are scored by the graph in rkv-graph.cpp (two products per layer, on any backend).
#include "rkv-engine.h"

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>

// the future query offsets 1, 2, 4, ..., 65536 (reference.TRI_OFFSETS)
static constexpr int RKV_TRI_N_OFFSETS = 17;

bool rkv_layer_rope(const llama_context & lctx, int32_t il, rkv_rope & out, std::vector<float> & freq_factors,
                    std::string & why) {
    const llama_model   & model = lctx.get_model();
    const llama_hparams & hp    = model.hparams;
    const llama_cparams & cp    = lctx.get_cparams();
    if (il < 0 || (uint32_t) il >= hp.n_layer()) {
        why = "no layer " + std::to_string(il);
        return false;
    }
    if (hp.rope_type != LLAMA_ROPE_TYPE_NORM && hp.rope_type != LLAMA_ROPE_TYPE_NEOX) {
        why = hp.rope_type == LLAMA_ROPE_TYPE_NONE ? "the model has no rotary position embedding"
                                                   : "only normal and NEOX RoPE are supported (not M-RoPE or vision RoPE)";
        return false;
    }
    // what llm_graph_context hands ggml_rope_ext in every layer (the models' own graphs)
    out = {};
    out.n_rot       = (int32_t) hp.n_rot(il);
    out.neox        = hp.rope_type == LLAMA_ROPE_TYPE_NEOX;
    out.freq_base   = model.get_rope_freq_base(cp, il);
    out.freq_scale  = model.get_rope_freq_scale(cp, il);
    out.ext_factor  = cp.yarn_ext_factor;
    out.attn_factor = cp.yarn_attn_factor;
    out.beta_fast   = cp.yarn_beta_fast;
    out.beta_slow   = cp.yarn_beta_slow;
    out.n_ctx_orig  = (int32_t) cp.n_ctx_orig_yarn;
    freq_factors.clear();
    if (const ggml_tensor * ff = model.get_rope_factors(cp, il)) {
        freq_factors.resize(ggml_nelements(ff));
        ggml_backend_tensor_get(ff, freq_factors.data(), 0, ggml_nbytes(ff));
    }
    out.n_freq_factors = (int32_t) freq_factors.size();
    return true;
}

// the angle per position of each rotated pair and YaRN's magnitude, in double (reference.Rope.frequencies)
static void rkv_rope_frequencies(const rkv_rope & r, const std::vector<float> & freq_factors,
                                 std::vector<double> & omega, double & mscale) {
    const int n = r.n_rot;
    double low = 0.0, high = 0.0;
    mscale = r.attn_factor;
    if (r.ext_factor != 0.0f) {
        auto corr_dim = [&](double n_rot) {
            return n*std::log(r.n_ctx_orig/(n_rot*2*M_PI))/(2*std::log((double) r.freq_base));
        };
        low  = std::max(0.0, std::floor(corr_dim(r.beta_fast)));
        high = std::min(n - 1.0, std::ceil(corr_dim(r.beta_slow)));
        mscale *= 1.0 + 0.1*std::log(1.0/r.freq_scale);
    }
    omega.resize(n/2);
    for (int i = 0; i < n/2; ++i) {
        double extrap = std::pow((double) r.freq_base, -2.0*i/n);
        if (!freq_factors.empty()) {
            extrap /= freq_factors[i];
        }
        double theta = r.freq_scale*extrap;
        if (r.ext_factor != 0.0f) {
            const double ramp = 1.0 - std::clamp((i - low)/std::max(0.001, high - low), 0.0, 1.0);
            const double mix  = ramp*r.ext_factor;
            theta = theta*(1.0 - mix) + extrap*mix;
        }
        omega[i] = theta;
    }
}

std::string rkv_engine::init_triattention(const llama_context & lctx) {
    tri.assign(n_layer(), {});
    for (uint32_t l = 0; l < n_layer(); ++l) {
        const int32_t il = kv.layers[l].il;
        rkv_rope rope;
        std::vector<float> freq_factors;
        std::string why;
        if (!rkv_layer_rope(lctx, il, rope, freq_factors, why)) {
            return "triattention: " + why;
        }
        if ((uint32_t) rope.n_rot != kv.hparams.n_embd_head_k(il)) {
            return "triattention: partial rotary dimensions (" + std::to_string(rope.n_rot) + " of " +
                   std::to_string(kv.hparams.n_embd_head_k(il)) + ") are not supported";
        }
        if (!freq_factors.empty() && (int32_t) freq_factors.size() < rope.n_rot/2) {
            return "triattention: the layer's RoPE frequency factors are fewer than its pairs";
        }
        tri[l].neox = rope.neox;
        rkv_rope_frequencies(rope, freq_factors, tri[l].omega, tri[l].mscale);
    }
    return "";
}

void rkv_engine::triattention_queries(uint32_t layer, llama_pos t, std::vector<float> & q_eff, std::vector<float> & w) const {
    const tri_layer & tl = tri[layer];
    const int32_t il     = kv.layers[layer].il;
    const int64_t d      = kv.hparams.n_embd_head_k(il);
    const int64_t half   = d/2;
    const int64_t n_head = kv.hparams.n_head(il);
    q_eff.assign(n_head*d, 0.0f);
    w.assign(n_head*half, 0.0f);
    for (int64_t h = 0; h < n_head; ++h) {
        for (int64_t f = 0; f < half; ++f) {
            const int64_t a = tl.neox ? f : 2*f;
            const int64_t b = tl.neox ? f + half : 2*f + 1;
            const double ca = tl.centres[h*d + a];
            const double cb = tl.centres[h*d + b];
            double sa = 0.0, sb = 0.0;
            for (int j = 0; j < RKV_TRI_N_OFFSETS; ++j) {
                const double angle = ((double) t + (double) (1 << j))*tl.omega[f];
                const double c = std::cos(angle), s = std::sin(angle);
                sa += ca*c - cb*s;
                sb += ca*s + cb*c;
            }
            q_eff[h*d + a] = (float) (tl.mscale*sa/RKV_TRI_N_OFFSETS);
            q_eff[h*d + b] = (float) (tl.mscale*sb/RKV_TRI_N_OFFSETS);
            w[h*half + f]  = (float) (tl.mscale*(tl.abs_means[h*half + f] - std::hypot(ca, cb)));
        }
    }
}
