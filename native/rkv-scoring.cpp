#include "rkv-scoring.h"

#include "rkv.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

// keys shorter than this are treated as zero vectors when normalised (as in reference.py)
static constexpr double RKV_NORM_EPS = 1e-12;

static inline float rkv_dot(const float * a, const float * b, int32_t n) {
    // four partial sums let the compiler vectorise without -ffast-math
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i + 0]*b[i + 0];
        s1 += a[i + 1]*b[i + 1];
        s2 += a[i + 2]*b[i + 2];
        s3 += a[i + 3]*b[i + 3];
    }
    for (; i < n; ++i) {
        s0 += a[i]*b[i];
    }
    return (s0 + s1) + (s2 + s3);
}

// softmax of x[0..n) in place, in double
static void rkv_softmax(double * x, int32_t n) {
    const double mx = *std::max_element(x, x + n);
    double sum = 0.0;
    for (int32_t i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - mx);
        sum += x[i];
    }
    for (int32_t i = 0; i < n; ++i) {
        x[i] /= sum;
    }
}

// Attention the candidates receive from queries [q_begin, n_queries): per query the max over the
// group's heads of the scaled logits, softmax over the candidates, mean over the queries, then
// max pooling over `kernel` neighbours. Written to scratch.scores.
static void rkv_importance(const rkv_params & params, const rkv_head_inputs & in, int32_t q_begin, int32_t kernel,
                           rkv_scratch & scratch) {
    const int32_t nc = in.n - params.window;
    const int32_t d  = in.head_dim;

    scratch.accum.assign(nc, 0.0);
    std::vector<double> & row = scratch.row_sum;
    row.resize(nc);

    for (int32_t a = q_begin; a < in.n_queries; ++a) {
        for (int32_t j = 0; j < nc; ++j) {
            float best = -std::numeric_limits<float>::infinity();
            for (int32_t g = 0; g < in.group; ++g) {
                const float * q = in.queries + ((size_t) a*in.group + g)*d;
                best = std::max(best, rkv_dot(q, in.keys + (size_t) j*d, d)*in.kq_scale);
            }
            row[j] = best;
        }
        rkv_softmax(row.data(), nc);
        for (int32_t j = 0; j < nc; ++j) {
            scratch.accum[j] += row[j];
        }
    }

    const double n_used = std::max(1, in.n_queries - q_begin);
    const int32_t r = kernel / 2;
    scratch.scores.resize(nc);
    for (int32_t j = 0; j < nc; ++j) {
        double best = -std::numeric_limits<double>::infinity();
        for (int32_t t = std::max(0, j - r); t <= std::min(nc - 1, j + r); ++t) {
            best = std::max(best, scratch.accum[t]);
        }
        scratch.scores[j] = (float) (best/n_used);
    }
}

// How much each candidate repeats other keys: cosine similarities with the diagonal zeroed and,
// per row, the most recent near-copy (> threshold) zeroed; column means; softmax over all n.
// Adds -weight * redundancy to scratch.scores.
static void rkv_subtract_redundancy(const rkv_params & params, const rkv_head_inputs & in, double weight,
                                    rkv_scratch & scratch) {
    const int32_t n  = in.n;
    const int32_t nc = n - params.window;
    const int32_t d  = in.head_dim;

    std::vector<float> & kn = scratch.keys_normed;
    kn.resize((size_t) n*d);
    for (int32_t i = 0; i < n; ++i) {
        const float * k = in.keys + (size_t) i*d;
        double norm = 0.0;
        for (int32_t c = 0; c < d; ++c) {
            norm += (double) k[c]*k[c];
        }
        const double inv = 1.0/std::max(std::sqrt(norm), RKV_NORM_EPS);
        for (int32_t c = 0; c < d; ++c) {
            kn[(size_t) i*d + c] = (float) (k[c]*inv);
        }
    }

    // S is symmetric: column sums equal row sums, so one pass over i < j suffices
    std::vector<double> & col = scratch.row_sum;
    col.assign(n, 0.0);
    scratch.last_similar.assign(n, -1);
    scratch.last_similar_value.assign(n, 0.0f);
    for (int32_t i = 0; i < n; ++i) {
        const float * ki = kn.data() + (size_t) i*d;
        for (int32_t j = i + 1; j < n; ++j) {
            const float s = rkv_dot(ki, kn.data() + (size_t) j*d, d);
            col[i] += s;
            col[j] += s;
            if (s > params.threshold) {
                // j grows within row i and i grows across rows: the last hit is the most recent
                scratch.last_similar[i] = j;
                scratch.last_similar_value[i] = s;
                scratch.last_similar[j] = i;
                scratch.last_similar_value[j] = s;
            }
        }
    }
    for (int32_t i = 0; i < n; ++i) {
        if (scratch.last_similar[i] >= 0) {
            col[scratch.last_similar[i]] -= scratch.last_similar_value[i];
        }
    }
    for (int32_t j = 0; j < n; ++j) {
        col[j] /= n;
    }
    rkv_softmax(col.data(), n);

    for (int32_t j = 0; j < nc; ++j) {
        scratch.scores[j] = (float) (scratch.scores[j] - weight*col[j]);
    }
}

void rkv_score_rkv(const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch) {
    rkv_importance(params, in, 0, params.kernel, scratch);
    for (float & s : scratch.scores) {
        s *= params.lambda;
    }
    rkv_subtract_redundancy(params, in, 1.0 - params.lambda, scratch);
}

void rkv_score_snapkv(const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch) {
    rkv_importance(params, in, 0, params.kernel, scratch);
}

void rkv_score_h2o(const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch) {
    rkv_importance(params, in, in.n_queries - 1, 1, scratch);
}

void rkv_score_streamingllm(const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch) {
    const int32_t nc = in.n - params.window;
    scratch.scores.resize(nc);
    for (int32_t j = 0; j < nc; ++j) {
        scratch.scores[j] = j < params.sink ? std::numeric_limits<float>::infinity() : (float) j;
    }
}

void rkv_select_head(const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch,
                     std::vector<int32_t> & kept) {
    kept.clear();
    if (in.n <= params.budget) {
        kept.resize(in.n);
        std::iota(kept.begin(), kept.end(), 0);
        return;
    }

    switch (params.method) {
        case RKV_METHOD_RKV:          rkv_score_rkv         (params, in, scratch); break;
        case RKV_METHOD_SNAPKV:       rkv_score_snapkv      (params, in, scratch); break;
        case RKV_METHOD_H2O:          rkv_score_h2o         (params, in, scratch); break;
        case RKV_METHOD_STREAMINGLLM: rkv_score_streamingllm(params, in, scratch); break;
    }

    const int32_t nc = in.n - params.window;
    const int32_t m  = params.budget - params.window;
    const std::vector<float> & score = scratch.scores;

    std::vector<int32_t> & order = scratch.order;
    order.resize(nc);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + m, order.end(), [&](int32_t a, int32_t b) {
        return score[a] != score[b] ? score[a] > score[b] : a < b;
    });

    kept.assign(order.begin(), order.begin() + m);
    std::sort(kept.begin(), kept.end());
    for (int32_t j = nc; j < in.n; ++j) {
        kept.push_back(j);
    }
}
