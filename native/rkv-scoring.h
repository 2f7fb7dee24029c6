// Token scoring of one layer and KV head, on the host, in float.
// The spec is rkv_local/reference.py: the same inputs must select the same tokens.
#pragma once

#include <cstdint>
#include <vector>

struct rkv_params;

struct rkv_head_inputs {
    const float * queries;  // [n_queries][group][head_dim]: the window queries of this head's group
    int32_t       n_queries;
    int32_t       group;    // query heads per KV head
    const float * keys;     // [n][head_dim] in time order; the last `window` are the window
    int32_t       n;
    int32_t       head_dim;
    float         kq_scale;
};

// Reusable work memory, one per thread.
struct rkv_scratch {
    std::vector<float>  logits;
    std::vector<double> accum;
    std::vector<float>  keys_normed;
    std::vector<double> row_sum;
    std::vector<int32_t> last_similar;
    std::vector<float>  last_similar_value;
    std::vector<float>  scores;
    std::vector<int32_t> order;
};

// Indices (into 0..n-1, ascending) of the tokens one head keeps: the best budget - window
// candidates by score, ties going to the older token, then the whole window.
void rkv_select_head(const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch,
                     std::vector<int32_t> & kept);

// Candidate scores (higher is kept) of each method; exposed for tests and inspection.
void rkv_score_rkv         (const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch);
void rkv_score_snapkv      (const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch);
void rkv_score_h2o         (const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch);
void rkv_score_streamingllm(const rkv_params & params, const rkv_head_inputs & in, rkv_scratch & scratch);
