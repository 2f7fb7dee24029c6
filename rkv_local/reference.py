"""Reference (spec) implementation of R-KV decode-time KV-cache eviction scoring.

R-KV: "Redundancy-aware KV Cache Compression for Reasoning Models" (arXiv 2505.24133).
The C++ engine must reproduce the selections made here. Everything is computed in
float64, per layer and per KV head, on N cached tokens in time order: the last
``window`` (alpha) tokens are always kept, the other Nc = N - alpha are candidates.

Spec choices (all deliberate, the engine must follow them):

* Importance: scaled logits Q.K^T * kq_scale of the candidate keys; for GQA the
  logits of the query heads of a group (query head qh -> kv head
  qh // (n_head // n_head_kv)) are reduced with MAX before the softmax; softmax over
  the Nc candidates per query, mean over the queries, then 1-D max pooling with an odd
  ``kernel`` (stride 1, padding kernel // 2, edges use the shrunken window).
* Attention sinks (gpt-oss): a model whose heads attend to a learned sink logit s_h (one per
  query head, added to the softmax's denominator, not scaled by kq_scale, attending to no value)
  scores the same way: the sink is one more column of the logits, reduced over a query group with
  MAX like a key's, then the softmax runs over the Nc candidates and the sink, and the sink's
  share is dropped. A query whose attention mostly goes to the sink so weighs less in the mean.
* Redundancy: keys L2-normalised as k / max(||k||, NORM_EPS); cosine matrix S [N,N]
  with zeroed diagonal; in every row i the LAST (largest) j with S[i,j] > threshold is
  zeroed (the newest near-copy is not penalised); rows without such j are unchanged
  ("last_similar"). ``authors_argmax=True`` mimics the authors' argmax, which zeroes
  column 0 for rows with no similar token. Then column mean -> softmax over all N
  columns -> first Nc values. ``threshold`` must lie in [0, 1], so the zeroed
  diagonal never counts as "similar".
* score = lam * importance - (1 - lam) * redundancy (snapkv: lam=1; h2o: lam=1, last
  query only, no pooling).
* Selection: top (budget - window) candidates ordered by (score descending, index
  ascending) - on exactly equal scores the OLDER token wins - plus every window token;
  kept indices are returned ascending. If N <= budget nothing is evicted.
* streamingllm: keeps the first ``sink`` tokens and the most recent budget - sink.
* keydiff (arXiv 2504.15364, as kvpress's KeyDiffPress scores it): no queries. Per KV head the
  anchor is the mean of the N L2-normalised keys (window included, as kvpress averages every key
  it scores); a candidate's score is minus its cosine similarity to the anchor, so the keys least
  like the average are kept. Keys are normalised with the NORM_EPS floor and the anchor's norm
  with the same floor (torch's cosine_similarity floors with 1e-8; only all-zero keys differ).
  The paper compresses block by block as a prompt is read; here, as for every method, at each
  decode-time compression.
* triattention (arXiv 2604.04921; checked against the authors' scorer, triattention/methods/
  pruning_utils.py and triattention.py of their repository, in tests/test_triattention_authors.py):
  no queries at run time, but calibration statistics of each layer's *pre-RoPE* queries, per query
  head: the centre c = E[q] (the mean vector; per rotated pair f it is the complex mean E[q_f]) and
  A_f = E|q_f|, the mean modulus of each rotated pair (``QueryStats``). Pairs are the ones the
  model's RoPE rotates: (2i, 2i+1) for llama.cpp's normal RoPE, (i, i + n_rot/2) for NEOX (the
  authors always split halves, which is the same pairing in Hugging Face's layout). With t the
  position of the next query (newest cached position + 1) and offsets o_j = 2^j, j = 0..16, a
  candidate's cached (post-RoPE) key k scores, for query head h:

      S_h(k) = mean_j < RoPE(c_h, t + o_j), k >  +  s * sum_f (A_hf - |c_hf|) * |k_f|

  where RoPE is the layer's rotation exactly as llama.cpp applies it (``Rope``: frequencies
  base^(-2i/n_rot) over freq_factors, linear freq_scale, YaRN's ramp and magnitude s), and |k_f|
  the modulus of the key's pair f. This equals the authors' series
  sum_f s^2 |c_f||k'_f| cos((t + o_j - p) w_f + arg(c_f conj k'_f)) over the pre-RoPE key
  k' = RoPE^-1(k, p) plus their norm term s^2 (A_f - |c_f|)|k'_f|, without inverting any key: the
  key's position is in its rotation. No 1/sqrt(d), no softmax. Each query head's S over the Nc
  candidates is z-scored ((S - mean) / max(std, 1e-6), population std), the heads of a KV group are
  reduced with MAX, and each layer and KV head keeps its best: the authors'
  ``per_layer_perhead_pruning`` mode. Their paper runs instead average the group maxima over the
  layers and keep one set per KV head for all layers; the engine selects per layer and head for
  every method, so we take their per-layer mode. They add 1e-6 uniform noise to break ties; we use
  the shared tie rule. They protect no recent window (their vLLM port protects 128 tokens) and
  always keep the prompt; here the window and the kept prompt follow the shared rules. Rotated
  dimensions only: a model with partial rotary dimensions (n_rot < head size) is refused.
* Kept prompt (``n_kept``): the first ``n_kept`` tokens are kept whole and are no part of the
  scoring: the tokens after them are selected as if they were the whole sequence (they are the
  candidates and the window; softmaxes and the similarity run over them only), so at most
  ``n_kept + budget`` tokens stay.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("rkv", "snapkv", "h2o", "streamingllm", "keydiff", "triattention")
TRI_OFFSETS = 2.0 ** np.arange(17)  # triattention: future query offsets 1, 2, 4, ..., 65536
TRI_STD_FLOOR = 1e-6
NORM_EPS = 1e-12  # key L2-norm floor used by redundancy()


@dataclass(frozen=True)
class ScoringParams:
    """Eviction parameters shared by all methods (budget/window in tokens)."""

    budget: int
    window: int = 8
    kernel: int = 7
    lam: float = 0.1
    threshold: float = 0.5
    sink: int = 4  # streamingllm's kept first tokens
    authors_argmax: bool = False


@dataclass(frozen=True)
class Rope:
    """A layer's rotary position embedding as llama.cpp applies it (ggml_rope_ext, no M-RoPE)."""

    n_rot: int
    neox: bool
    freq_base: float = 10000.0
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_ctx_orig: int = 0
    freq_factors: tuple[float, ...] | None = None

    def frequencies(self) -> tuple[np.ndarray, float]:
        """Angle per position of each rotated pair, [n_rot/2], and the magnitude s (YaRN's mscale)."""
        n = self.n_rot
        i = np.arange(n // 2, dtype=np.float64)
        extrap = self.freq_base ** (-2.0 * i / n)
        if self.freq_factors is not None:
            extrap = extrap / np.asarray(self.freq_factors, dtype=np.float64)
        theta = self.freq_scale * extrap
        mscale = self.attn_factor
        if self.ext_factor != 0.0:
            def corr_dim(n_rot: float) -> float:
                return n * np.log(self.n_ctx_orig / (n_rot * 2 * np.pi)) / (2 * np.log(self.freq_base))
            low = max(0.0, np.floor(corr_dim(self.beta_fast)))
            high = min(n - 1.0, np.ceil(corr_dim(self.beta_slow)))
            ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
            mix = ramp * self.ext_factor
            theta = theta * (1.0 - mix) + extrap * mix
            mscale *= 1.0 + 0.1 * np.log(1.0 / self.freq_scale)
        return theta, float(mscale)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the two components of each rotated pair."""
        half = np.arange(self.n_rot // 2)
        return (half, half + self.n_rot // 2) if self.neox else (2 * half, 2 * half + 1)

    def rotate(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x [..., n_tok, n_head, d] rotated at positions [n_tok] (negative positions rotate back)."""
        x = np.asarray(x, dtype=np.float64)
        theta, mscale = self.frequencies()
        angle = np.asarray(positions, dtype=np.float64)[:, None, None] * theta   # [n_tok, 1, n_rot/2]
        cos, sin = np.cos(angle) * mscale, np.sin(angle) * mscale
        a, b = self.pairs()
        out = x.copy()
        out[..., a] = x[..., a] * cos - x[..., b] * sin
        out[..., b] = x[..., a] * sin + x[..., b] * cos
        return out

    def unrotate(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The inverse of ``rotate`` (the magnitude s divided out)."""
        _, mscale = self.frequencies()
        return self.rotate(x, -np.asarray(positions, dtype=np.float64)) / mscale**2

    def pair_moduli(self, x: np.ndarray) -> np.ndarray:
        """|x_f| of each rotated pair: [..., n_rot/2]."""
        a, b = self.pairs()
        x = np.asarray(x, dtype=np.float64)
        return np.hypot(x[..., a], x[..., b])


@dataclass(frozen=True)
class QueryStats:
    """triattention's calibration of one layer: per query head, the mean pre-RoPE query [n_head, d]
    and the mean modulus of each of its rotated pairs [n_head, n_rot/2]."""

    centre: np.ndarray
    abs_mean: np.ndarray


@dataclass(frozen=True)
class TriAttentionInputs:
    """What triattention scores with besides the keys: the layer's statistics and RoPE, and the
    position of the next query (the newest cached token's + 1)."""

    stats: QueryStats
    rope: Rope
    position: int


def triattention_query_scores(keys: np.ndarray, n_candidates: int, tri: TriAttentionInputs) -> np.ndarray:
    """Raw S_h of the candidates for every query head, [n_head, Nc] (see module doc)."""
    keys = np.asarray(keys, dtype=np.float64)
    centre = np.asarray(tri.stats.centre, dtype=np.float64)
    n_head, d = centre.shape
    n_head_kv = keys.shape[1]
    if keys.shape[2] != d or tri.rope.n_rot != d or n_head % n_head_kv:
        raise ValueError(f"triattention: keys {keys.shape}, centres {centre.shape}, n_rot {tri.rope.n_rot}")
    positions = tri.position + TRI_OFFSETS
    rotated = tri.rope.rotate(np.broadcast_to(centre, (len(positions), n_head, d)), positions)  # [17, n_head, d]
    _, mscale = tri.rope.frequencies()
    weights = mscale * (np.asarray(tri.stats.abs_mean, dtype=np.float64) - tri.rope.pair_moduli(centre))
    kv_of = np.arange(n_head) // (n_head // n_head_kv)
    cand = keys[:n_candidates, kv_of]                                             # [Nc, n_head, d]
    trig = np.einsum("ohd,nhd->hn", rotated, cand) / len(positions)
    norm = np.einsum("hf,nhf->hn", weights, tri.rope.pair_moduli(cand))
    return trig + norm


def triattention_scores(keys: np.ndarray, n_candidates: int, tri: TriAttentionInputs) -> np.ndarray:
    """Candidate scores [n_head_kv, Nc]: each query head's S z-scored, MAX over a KV group."""
    raw = triattention_query_scores(keys, n_candidates, tri)
    if n_candidates == 0:
        return np.zeros((keys.shape[1], 0))
    z = (raw - raw.mean(axis=1, keepdims=True)) / np.maximum(raw.std(axis=1, keepdims=True), TRI_STD_FLOOR)
    n_head_kv = keys.shape[1]
    return z.reshape(n_head_kv, -1, n_candidates).max(axis=1)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


def max_pool_1d(values: np.ndarray, kernel: int) -> np.ndarray:
    """Max pooling along the last axis: out[i] = max(x[max(0, i-r) : i+r+1]), r = kernel // 2."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be a positive odd integer, got {kernel}")
    values = np.asarray(values, dtype=np.float64)
    radius = kernel // 2
    if radius == 0 or values.shape[-1] == 0:
        return values.copy()
    pad = [(0, 0)] * (values.ndim - 1) + [(radius, radius)]
    padded = np.pad(values, pad, constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(padded, kernel, axis=-1).max(axis=-1)


def _check_shapes(queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    queries = np.asarray(queries, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    if queries.ndim != 3:
        raise ValueError(f"queries must be [n_queries, n_head, d], got shape {queries.shape}")
    if keys.ndim != 3:
        raise ValueError(f"keys must be [n_tokens, n_head_kv, d], got shape {keys.shape}")
    if queries.shape[0] < 1:
        raise ValueError("at least one query is required")
    if queries.shape[2] != keys.shape[2]:
        raise ValueError(f"head dim mismatch: queries d={queries.shape[2]}, keys d={keys.shape[2]}")
    n_head, n_head_kv = queries.shape[1], keys.shape[1]
    if n_head_kv < 1 or n_head % n_head_kv != 0:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_head_kv ({n_head_kv})")
    return queries, keys


def _check_params(method: str, params: ScoringParams) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if params.window < 0:
        raise ValueError(f"window must be >= 0, got {params.window}")
    if params.budget <= params.window:
        raise ValueError(f"budget ({params.budget}) must exceed window ({params.window})")
    if params.kernel < 1 or params.kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be a positive odd integer, got {params.kernel}")
    if not 0.0 <= params.threshold <= 1.0:
        raise ValueError(f"similarity threshold must be in [0, 1], got {params.threshold}")
    if params.sink < 0:
        raise ValueError(f"sink must be >= 0, got {params.sink}")
    if method == "streamingllm" and params.budget < params.sink + params.window:
        raise ValueError(
            f"streamingllm needs budget ({params.budget}) >= sink ({params.sink}) + window ({params.window})"
        )


def _check_sinks(sinks: np.ndarray | None, n_head: int) -> np.ndarray | None:
    if sinks is None:
        return None
    sinks = np.asarray(sinks, dtype=np.float64)
    if sinks.shape != (n_head,):
        raise ValueError(f"sinks must be [n_head] = [{n_head}], got shape {sinks.shape}")
    return sinks


def importance(
    queries: np.ndarray, keys_candidates: np.ndarray, kq_scale: float, kernel: int, sinks: np.ndarray | None = None
) -> np.ndarray:
    """Pooled attention importance of the candidate keys, [n_head_kv, Nc].

    queries [n_q, n_head, d], keys_candidates [Nc, n_head_kv, d], sinks [n_head] or None. GQA
    groups are reduced with max over the raw scaled logits (and over their sink logits), then
    softmax over Nc (and the sink, whose share is dropped), mean over queries, pooling.
    """
    queries, keys_candidates = _check_shapes(queries, keys_candidates)
    n_q, n_head, d = queries.shape
    n_head_kv = keys_candidates.shape[1]
    sinks = _check_sinks(sinks, n_head)
    grouped = queries.reshape(n_q, n_head_kv, n_head // n_head_kv, d)
    logits = np.einsum("qkgd,nkd->qkgn", grouped, keys_candidates) * float(kq_scale)
    group_max = logits.max(axis=2)  # [n_q, n_head_kv, Nc]
    n_candidates = group_max.shape[-1]
    if n_candidates == 0:
        return np.zeros((n_head_kv, 0))
    if sinks is not None:
        sink_max = sinks.reshape(n_head_kv, n_head // n_head_kv).max(axis=1)  # [n_head_kv]
        sink_column = np.broadcast_to(sink_max[None, :, None], (n_q, n_head_kv, 1))
        group_max = np.concatenate([group_max, sink_column], axis=-1)
    attention = _softmax(group_max, axis=-1)[..., :n_candidates].mean(axis=0)
    return max_pool_1d(attention, kernel)


def redundancy(keys: np.ndarray, n_candidates: int, threshold: float, authors_argmax: bool = False) -> np.ndarray:
    """Redundancy of the first n_candidates tokens, [n_head_kv, Nc] (see module doc)."""
    keys = np.asarray(keys, dtype=np.float64)
    if keys.ndim != 3:
        raise ValueError(f"keys must be [n_tokens, n_head_kv, d], got shape {keys.shape}")
    n_tokens = keys.shape[0]
    if not 0 <= n_candidates <= n_tokens:
        raise ValueError(f"n_candidates ({n_candidates}) must be in [0, {n_tokens}]")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"similarity threshold must be in [0, 1], got {threshold}")
    per_head = np.moveaxis(keys, 1, 0)  # [n_head_kv, N, d]
    norms = np.linalg.norm(per_head, axis=-1, keepdims=True)
    unit = per_head / np.maximum(norms, NORM_EPS)
    similarity = unit @ np.swapaxes(unit, 1, 2)  # [n_head_kv, N, N]
    rows = np.arange(n_tokens)
    similarity[:, rows, rows] = 0.0
    similar = similarity > threshold
    last_similar = n_tokens - 1 - np.argmax(similar[:, :, ::-1], axis=-1)  # [n_head_kv, N]
    has_similar = similar.any(axis=-1)
    for head in range(similarity.shape[0]):
        zero_rows = rows if authors_argmax else rows[has_similar[head]]
        zero_cols = np.where(has_similar[head], last_similar[head], 0)[zero_rows]
        similarity[head, zero_rows, zero_cols] = 0.0
    column_mean = similarity.mean(axis=1)  # [n_head_kv, N]
    return _softmax(column_mean, axis=-1)[:, :n_candidates]


def keydiff_scores(keys: np.ndarray, n_candidates: int) -> np.ndarray:
    """Minus each candidate key's cosine similarity to its head's mean normalised key, [n_head_kv, Nc]."""
    per_head = np.moveaxis(np.asarray(keys, dtype=np.float64), 1, 0)  # [n_head_kv, N, d]
    unit = per_head / np.maximum(np.linalg.norm(per_head, axis=-1, keepdims=True), NORM_EPS)
    anchor = unit.mean(axis=1)  # [n_head_kv, d]
    anchor /= np.maximum(np.linalg.norm(anchor, axis=-1, keepdims=True), NORM_EPS)
    return -np.einsum("hnd,hd->hn", unit[:, :n_candidates], anchor)


def head_scores(
    method: str,
    queries: np.ndarray,
    keys: np.ndarray,
    kq_scale: float,
    params: ScoringParams,
    sinks: np.ndarray | None = None,
    tri: TriAttentionInputs | None = None,
) -> np.ndarray:
    """Candidate scores [n_head_kv, Nc]; higher is kept first. ``sinks``: the layer's [n_head]
    attention-sink logits, None for a model without them; ``tri``: triattention's inputs.

    streamingllm: score = candidate index (newer first), sink tokens get Nc + index
    so they outrank every other candidate; this reproduces its positional selection.
    """
    _check_params(method, params)
    queries, keys = _check_shapes(queries, keys)
    n_tokens, n_head_kv = keys.shape[0], keys.shape[1]
    n_candidates = max(n_tokens - params.window, 0)
    if method == "streamingllm":
        index = np.arange(n_candidates, dtype=np.float64)
        score = np.where(index < params.sink, index + n_candidates, index)
        return np.tile(score, (n_head_kv, 1))
    if method == "keydiff":
        return keydiff_scores(keys, n_candidates)
    if method == "triattention":
        if tri is None:
            raise ValueError("triattention needs its calibration statistics, RoPE and position (tri=...)")
        return triattention_scores(keys, n_candidates, tri)
    candidates = keys[:n_candidates]
    if method == "h2o":
        return importance(queries[-1:], candidates, kq_scale, kernel=1, sinks=sinks)
    attention = importance(queries, candidates, kq_scale, params.kernel, sinks=sinks)
    if method == "snapkv":
        return attention
    redundant = redundancy(keys, n_candidates, params.threshold, params.authors_argmax)
    return params.lam * attention - (1.0 - params.lam) * redundant


def _top_candidates(scores_row: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` best candidates: score descending, then index ascending."""
    order = np.lexsort((np.arange(scores_row.shape[0]), -scores_row))
    return order[:count]


def select(
    method: str,
    queries: np.ndarray,
    keys: np.ndarray,
    kq_scale: float,
    params: ScoringParams,
    sinks: np.ndarray | None = None,
    n_kept: int = 0,
    tri: TriAttentionInputs | None = None,
) -> list[np.ndarray]:
    """Kept token indices per kv head (ascending, length min(N, n_kept + budget))."""
    _check_params(method, params)
    queries, keys = _check_shapes(queries, keys)
    if n_kept:
        if not 0 <= n_kept <= keys.shape[0]:
            raise ValueError(f"n_kept = {n_kept} for {keys.shape[0]} tokens")
        rest = select(method, queries, keys[n_kept:], kq_scale, params, sinks, tri=tri)
        return [np.concatenate([np.arange(n_kept), n_kept + kept]) for kept in rest]
    n_tokens, n_head_kv = keys.shape[0], keys.shape[1]
    if n_tokens <= params.budget:
        return [np.arange(n_tokens) for _ in range(n_head_kv)]
    scores = head_scores(method, queries, keys, kq_scale, params, sinks, tri)
    n_candidates = n_tokens - params.window
    window_indices = np.arange(n_candidates, n_tokens)
    kept = []
    for head in range(n_head_kv):
        best = _top_candidates(scores[head], params.budget - params.window)
        kept.append(np.sort(np.concatenate([best, window_indices])))
    return kept


def cutoff_ties(scores_row: np.ndarray, kept_row: np.ndarray, budget_candidates: int, rtol: float = 1e-4) -> set:
    """Candidate indices interchangeable at the cut-off.

    The cut-off score is the lowest score among the candidates in kept_row (indices
    >= len(scores_row) are window tokens and ignored); there must be exactly
    budget_candidates of them. Returned: every candidate i with
    |score_i - cutoff| <= rtol * max(|cutoff|, mean |scores_row|).
    """
    scores_row = np.asarray(scores_row, dtype=np.float64)
    kept_row = np.asarray(kept_row)
    kept_candidates = kept_row[kept_row < scores_row.shape[0]]
    if kept_candidates.shape[0] != budget_candidates:
        raise ValueError(f"kept_row holds {kept_candidates.shape[0]} candidates, expected {budget_candidates}")
    if budget_candidates == 0:
        return set()
    cutoff = scores_row[kept_candidates].min()
    tolerance = rtol * max(abs(cutoff), float(np.mean(np.abs(scores_row))))
    return {int(i) for i in np.flatnonzero(np.abs(scores_row - cutoff) <= tolerance)}


def kept_sets_equivalent(
    method: str,
    queries: np.ndarray,
    keys: np.ndarray,
    kq_scale: float,
    params: ScoringParams,
    other_kept: list,
    rtol: float = 1e-4,
    sinks: np.ndarray | None = None,
    tri: TriAttentionInputs | None = None,
) -> bool:
    """True when other_kept (per kv head) matches select() up to cut-off ties.

    Each head must keep min(N, budget) distinct valid indices including every window
    token; tokens kept by only one side must all be within tolerance of the cut-off
    score (max pooling creates plateaus of equal scores). streamingllm is positional,
    so it must match exactly.
    """
    ours = select(method, queries, keys, kq_scale, params, sinks, tri=tri)
    if len(other_kept) != len(ours):
        return False
    n_tokens = np.asarray(keys).shape[0]
    evicting = n_tokens > params.budget
    scores = head_scores(method, queries, keys, kq_scale, params, sinks, tri) if evicting else None
    n_candidates = n_tokens - params.window
    for head, our_row in enumerate(ours):
        other_row = np.asarray(other_kept[head]).astype(np.int64).ravel()
        other_set = set(other_row.tolist())
        if len(other_row) != len(our_row) or len(other_set) != len(other_row):
            return False
        if not other_set <= set(range(n_tokens)) or not set(range(max(n_candidates, 0), n_tokens)) <= other_set:
            return False
        differing = other_set ^ set(our_row.tolist())
        if not differing:
            continue
        if not evicting or method == "streamingllm":
            return False
        ties = cutoff_ties(scores[head], our_row, params.budget - params.window, rtol)
        if not differing <= ties:
            return False
    return True
