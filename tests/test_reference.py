"""Tests for rkv_local/reference.py (the scoring spec the C++ engine must match)."""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

# loaded by path so the test does not depend on rkv_local/__init__.py
_PATH = pathlib.Path(__file__).resolve().parents[1] / "rkv_local" / "reference.py"
_SPEC = importlib.util.spec_from_file_location("rkv_reference_under_test", _PATH)
ref = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = ref  # dataclasses needs the module registered
_SPEC.loader.exec_module(ref)

ScoringParams = ref.ScoringParams


# ---------------------------------------------------------------- brute force
def _brute_importance(queries, keys, n_candidates, scale, kernel, sinks=None):
    n_q, n_head, d = queries.shape
    n_kv = keys.shape[1]
    group = n_head // n_kv
    out = []
    for h in range(n_kv):
        mean = [0.0] * n_candidates
        for q in range(n_q):
            logits = []
            for j in range(n_candidates):
                best = -math.inf
                for qh in range(n_head):
                    if qh // group != h:
                        continue
                    dot = sum(float(queries[q, qh, t]) * float(keys[j, h, t]) for t in range(d))
                    best = max(best, dot * scale)
                logits.append(best)
            # the sink: one more logit per query head, reduced over the group like a key's
            sink = None if sinks is None else max(float(sinks[qh]) for qh in range(n_head) if qh // group == h)
            top = max(logits + ([sink] if sink is not None else []))
            exps = [math.exp(v - top) for v in logits]
            total = sum(exps) + (math.exp(sink - top) if sink is not None else 0.0)
            for j in range(n_candidates):
                mean[j] += exps[j] / total / n_q
        r = kernel // 2
        out.append([max(mean[max(0, i - r): i + r + 1]) for i in range(n_candidates)])
    return out


def _brute_unit_keys(keys, h):
    """Head h's keys, each divided by its norm (floored at 1e-12)."""
    n, _, d = keys.shape
    unit = []
    for i in range(n):
        norm = math.sqrt(sum(float(keys[i, h, t]) ** 2 for t in range(d)))
        unit.append([float(keys[i, h, t]) / max(norm, 1e-12) for t in range(d)])
    return unit


def _brute_redundancy(keys, n_candidates, threshold, authors_argmax=False):
    n, n_kv, d = keys.shape
    out = []
    for h in range(n_kv):
        unit = _brute_unit_keys(keys, h)
        sim = [[0.0 if i == j else sum(a * b for a, b in zip(unit[i], unit[j])) for j in range(n)] for i in range(n)]
        for i in range(n):
            last = None
            for j in range(n):
                if sim[i][j] > threshold:
                    last = j
            if last is not None:
                sim[i][last] = 0.0
            elif authors_argmax:
                sim[i][0] = 0.0
        col = [sum(sim[i][j] for i in range(n)) / n for j in range(n)]
        top = max(col)
        exps = [math.exp(v - top) for v in col]
        total = sum(exps)
        out.append([exps[j] / total for j in range(n_candidates)])
    return out


def _brute_keydiff(keys, n_candidates):
    n, n_kv, d = keys.shape
    out = []
    for h in range(n_kv):
        unit = _brute_unit_keys(keys, h)
        anchor = [sum(u[t] for u in unit) / n for t in range(d)]
        anchor_norm = math.sqrt(sum(a * a for a in anchor))
        out.append([-sum(u * a for u, a in zip(unit[j], anchor)) / anchor_norm for j in range(n_candidates)])
    return out


def _tri_inputs(method, n_head, d, seed=0):
    """triattention's calibration, RoPE and position for a random case (None for other methods)."""
    if method != "triattention":
        return None
    rng = np.random.default_rng(900 + seed)
    stats = ref.QueryStats(centre=rng.normal(size=(n_head, d)), abs_mean=rng.uniform(1.0, 3.0, size=(n_head, d // 2)))
    return ref.TriAttentionInputs(stats, ref.Rope(n_rot=d, neox=bool(seed % 2), freq_base=100.0), position=120)


def _brute_triattention(keys, n_candidates, tri):
    """The authors' series, key by key: invert each key's RoPE at an assumed position j, then
    sum_f |c_f||k_f| cos((t + o - j) w_f + arg(c_f conj k_f)) over the offsets, plus the norm term."""
    import cmath
    n, n_kv, d = keys.shape
    n_head = tri.stats.centre.shape[0]
    group = n_head // n_kv
    omega, _ = tri.rope.frequencies()
    a, b = tri.rope.pairs()
    raw = []
    for qh in range(n_head):
        c = [complex(tri.stats.centre[qh, a[f]], tri.stats.centre[qh, b[f]]) for f in range(d // 2)]
        row = []
        for j in range(n_candidates):
            k_pre = tri.rope.unrotate(keys[j:j + 1, qh // group][:, None, :], np.array([j]))[0, 0]
            k = [complex(k_pre[a[f]], k_pre[b[f]]) for f in range(d // 2)]
            trig = 0.0
            for o in ref.TRI_OFFSETS:
                for f in range(d // 2):
                    z = c[f] * k[f].conjugate()
                    trig += abs(z) * math.cos((tri.position + o - j) * omega[f] + cmath.phase(z))
            norm = sum((tri.stats.abs_mean[qh, f] - abs(c[f])) * abs(k[f]) for f in range(d // 2))
            row.append(trig / len(ref.TRI_OFFSETS) + norm)
        raw.append(row)
    out = []
    for h in range(n_kv):
        zs = []
        for row in raw[h * group:(h + 1) * group]:
            mean = sum(row) / len(row)
            std = max(math.sqrt(sum((x - mean) ** 2 for x in row) / len(row)), 1e-6)
            zs.append([(x - mean) / std for x in row])
        out.append([max(z[j] for z in zs) for j in range(n_candidates)])
    return out


def _brute_select(method, queries, keys, scale, p, sinks=None, tri=None):
    n, n_kv = keys.shape[0], keys.shape[1]
    if n <= p.budget:
        return [list(range(n)) for _ in range(n_kv)], None
    nc = n - p.window
    if method == "streamingllm":
        kept = sorted(set(range(p.sink)) | set(range(n - (p.budget - p.sink), n)))
        return [kept for _ in range(n_kv)], None
    if method == "h2o":
        scores = _brute_importance(queries[-1:], keys, nc, scale, 1, sinks)
    elif method == "keydiff":
        scores = _brute_keydiff(keys, nc)
    elif method == "triattention":
        scores = _brute_triattention(keys, nc, tri)
    else:
        scores = _brute_importance(queries, keys, nc, scale, p.kernel, sinks)
    if method == "rkv":
        red = _brute_redundancy(keys, nc, p.threshold, p.authors_argmax)
        scores = [[p.lam * a - (1 - p.lam) * b for a, b in zip(sr, rr)] for sr, rr in zip(scores, red)]
    kept = []
    for h in range(n_kv):
        order = sorted(range(nc), key=lambda j: (-scores[h][j], j))
        kept.append(sorted(order[: p.budget - p.window] + list(range(nc, n))))
    return kept, scores


def _random_case(rng, n_tokens, n_head, n_kv, d=8, n_q=8):
    queries = rng.normal(size=(n_q, n_head, d))
    keys = rng.normal(size=(n_tokens, n_kv, d))
    # a few near-duplicate keys so the redundancy zeroing actually triggers
    keys[5] = keys[2] + 0.05 * rng.normal(size=(n_kv, d))
    keys[11] = keys[2] + 0.05 * rng.normal(size=(n_kv, d))
    return queries, keys, 1.0 / math.sqrt(d)


# ---------------------------------------------------------------- hand-computed cases
def test_max_pool_semantics():
    x = np.array([0, 5, 0, 0, 0, 0, 0, 0, 0, 1, 0], dtype=float)
    assert ref.max_pool_1d(x, 7).tolist() == [5, 5, 5, 5, 5, 0, 1, 1, 1, 1, 1]
    assert ref.max_pool_1d(x, 3).tolist() == [5, 5, 5, 0, 0, 0, 0, 0, 1, 1, 1]
    assert ref.max_pool_1d(x, 1).tolist() == x.tolist()


def test_importance_single_candidate_spike_makes_plateau():
    keys = np.zeros((12, 1, 2))
    keys[6, 0] = [10.0, 0.0]
    queries = np.tile(np.array([1.0, 0.0]), (3, 1, 1)).reshape(3, 1, 2)
    imp = ref.importance(queries, keys, 1.0, 7)[0]
    peak = math.exp(10) / (math.exp(10) + 11)
    assert imp[3:10] == pytest.approx([peak] * 7)
    assert imp[:3] == pytest.approx([1 / (math.exp(10) + 11)] * 3)


def _unit_keys(vectors):
    return np.array(vectors, dtype=float).reshape(len(vectors), 1, 2)


def test_redundancy_newest_copy_not_penalised():
    # tokens 0,1,2 identical, token 3 orthogonal
    keys = _unit_keys([[1, 0], [1, 0], [1, 0], [0, 1]])
    # rows after zeroing: r0 [0,1,0,0] r1 [1,0,0,0] r2 [1,0,0,0] r3 [0,0,0,0]
    means = np.array([0.5, 0.25, 0.0, 0.0])
    expected = np.exp(means) / np.exp(means).sum()
    red = ref.redundancy(keys, 4, 0.5)[0]
    assert red == pytest.approx(expected, rel=1e-12)
    assert red[2] == pytest.approx(red[3])  # newest copy scores like the unique token
    assert red[0] > red[1] > red[2]
    assert ref.redundancy(keys, 2, 0.5).shape == (1, 2)


def test_authors_argmax_differs_only_on_column_0():
    s = math.sqrt(1 - 0.16)
    keys = _unit_keys([[1, 0], [1, 0], [1, 0], [0.4, s]])  # token 3: cos 0.4 < 0.5, no similar
    ours = ref.redundancy(keys, 4, 0.5)[0]
    authors = ref.redundancy(keys, 4, 0.5, authors_argmax=True)[0]
    # rows after zeroing: r0 [0,1,0,.4] r1 [1,0,0,.4] r2 [1,0,0,.4] r3 [.4,.4,.4,0] (authors: r3[0]=0)
    means_ours = np.array([2.4 / 4, 1.4 / 4, 0.4 / 4, 1.2 / 4])
    means_authors = np.array([2.0 / 4, 1.4 / 4, 0.4 / 4, 1.2 / 4])
    assert ours == pytest.approx(np.exp(means_ours) / np.exp(means_ours).sum(), rel=1e-12)
    assert authors == pytest.approx(np.exp(means_authors) / np.exp(means_authors).sum(), rel=1e-12)
    # pre-softmax means differ only at column 0 <=> log-ratio constant elsewhere
    log_ratio = np.log(ours) - np.log(authors)
    assert np.ptp(log_ratio[1:]) < 1e-12
    assert abs(log_ratio[0] - log_ratio[1] - 0.1) < 1e-12


def test_authors_argmax_same_when_every_row_has_a_similar_token():
    keys = _unit_keys([[1, 0], [1, 0], [0, 1], [0, 1]])
    assert np.array_equal(ref.redundancy(keys, 4, 0.5), ref.redundancy(keys, 4, 0.5, authors_argmax=True))


def test_streamingllm_keeps_sinks_and_recent():
    rng = np.random.default_rng(0)
    queries, keys, scale = _random_case(rng, 20, 2, 2)
    kept = ref.select("streamingllm", queries, keys, scale, ScoringParams(budget=10, window=4))
    for row in kept:
        assert row.tolist() == [0, 1, 2, 3, 14, 15, 16, 17, 18, 19]


@pytest.mark.parametrize("method", ref.METHODS)
def test_window_kept_sorted_and_length_budget(method):
    rng = np.random.default_rng(1)
    queries, keys, scale = _random_case(rng, 40, 4, 2)
    keys[-8:] *= 0.0  # window tokens would score terribly if they were scored
    kept = ref.select(method, queries, keys, scale, ScoringParams(budget=16), tri=_tri_inputs(method, 4, 8))
    assert len(kept) == 2
    for row in kept:
        assert len(row) == 16
        assert np.all(np.diff(row) > 0)
        assert set(range(32, 40)) <= set(row.tolist())


@pytest.mark.parametrize("method", ref.METHODS)
def test_no_eviction_when_within_budget(method):
    rng = np.random.default_rng(2)
    queries, keys, scale = _random_case(rng, 16, 2, 1)
    for row in ref.select(method, queries, keys, scale, ScoringParams(budget=16), tri=_tri_inputs(method, 2, 8)):
        assert row.tolist() == list(range(16))


def _plateau_case():
    """snapkv: candidate 10 dominates, pooling gives candidates 7..13 equal scores."""
    n, d = 40, 2
    keys = np.zeros((n, 1, d))
    keys[:, 0, 1] = np.linspace(-1, 1, n)  # distinct, harmless filler
    keys[10, 0] = [10.0, 0.0]
    queries = np.tile(np.array([1.0, 0.0]), (8, 1, 1)).reshape(8, 1, d)
    return queries, keys, ScoringParams(budget=12)  # 4 candidates kept


def test_ties_older_token_wins():
    queries, keys, params = _plateau_case()
    kept = ref.select("snapkv", queries, keys, 1.0, params)[0]
    assert kept.tolist() == [7, 8, 9, 10] + list(range(32, 40))


def test_kept_sets_equivalent_accepts_plateau_swap_rejects_real_difference():
    queries, keys, params = _plateau_case()
    ours = ref.select("snapkv", queries, keys, 1.0, params)[0].tolist()
    assert ref.kept_sets_equivalent("snapkv", queries, keys, 1.0, params, [ours])
    swapped = sorted([7, 8, 9, 12] + list(range(32, 40)))
    assert ref.kept_sets_equivalent("snapkv", queries, keys, 1.0, params, [swapped])
    scores = ref.head_scores("snapkv", queries, keys, 1.0, params)[0]
    assert ref.cutoff_ties(scores, np.array(ours), 4) == set(range(7, 14))
    real_diff = sorted([7, 8, 9, 20] + list(range(32, 40)))
    assert not ref.kept_sets_equivalent("snapkv", queries, keys, 1.0, params, [real_diff])
    missing_window = sorted([7, 8, 9, 10, 11] + list(range(33, 40)))
    assert not ref.kept_sets_equivalent("snapkv", queries, keys, 1.0, params, [missing_window])
    assert not ref.kept_sets_equivalent("snapkv", queries, keys, 1.0, params, [ours[:-1]])
    assert not ref.kept_sets_equivalent("snapkv", queries, keys, 1.0, params, [ours, ours])


def test_kept_sets_equivalent_streamingllm_is_exact():
    rng = np.random.default_rng(3)
    queries, keys, scale = _random_case(rng, 30, 2, 1)
    params = ScoringParams(budget=12)
    ours = ref.select("streamingllm", queries, keys, scale, params)
    assert ref.kept_sets_equivalent("streamingllm", queries, keys, scale, params, ours)
    shifted = [np.array([0, 1, 2, 4] + list(range(22, 30)))]
    assert not ref.kept_sets_equivalent("streamingllm", queries, keys, scale, params, shifted)


# ---------------------------------------------------------------- brute force comparison
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("method", ref.METHODS)
@pytest.mark.parametrize("authors_argmax", [False, True])
def test_matches_brute_force(method, group, authors_argmax):
    rng = np.random.default_rng(100 + group)
    n_kv = 2
    queries, keys, scale = _random_case(rng, 29, n_kv * group, n_kv, d=6, n_q=8)
    params = ScoringParams(budget=17, authors_argmax=authors_argmax)
    tri = _tri_inputs(method, n_kv * group, 6, seed=group)
    expected_kept, expected_scores = _brute_select(method, queries, keys, scale, params, tri=tri)
    kept = ref.select(method, queries, keys, scale, params, tri=tri)
    assert [row.tolist() for row in kept] == expected_kept
    if expected_scores is not None:
        got = ref.head_scores(method, queries, keys, scale, params, tri=tri)
        np.testing.assert_allclose(got, np.array(expected_scores), rtol=1e-10, atol=1e-12)
    assert ref.kept_sets_equivalent(method, queries, keys, scale, params, expected_kept, tri=tri)


def test_brute_force_components_on_gqa():
    rng = np.random.default_rng(7)
    queries, keys, scale = _random_case(rng, 24, 8, 2, d=5, n_q=3)
    np.testing.assert_allclose(
        ref.importance(queries, keys[:16], scale, 7), _brute_importance(queries, keys, 16, scale, 7), rtol=1e-10
    )
    np.testing.assert_allclose(ref.redundancy(keys, 16, 0.5), _brute_redundancy(keys, 16, 0.5), rtol=1e-10)


def test_gqa_uses_group_max_not_mean():
    keys = np.zeros((3, 1, 2))
    keys[0, 0] = [1.0, 0.0]
    keys[1, 0] = [0.0, 1.0]
    queries = np.array([[[4.0, 0.0], [0.0, 0.0]]])  # query head 1 is flat
    imp = ref.importance(queries, keys, 1.0, 1)[0]
    expected = np.exp([4.0, 0.0, 0.0]) / np.exp([4.0, 0.0, 0.0]).sum()
    assert imp == pytest.approx(expected)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("method", ref.METHODS)
def test_sinks_match_brute_force(method, group):
    rng = np.random.default_rng(300 + group)
    n_kv = 2
    queries, keys, scale = _random_case(rng, 29, n_kv * group, n_kv, d=6, n_q=8)
    sinks = rng.normal(scale=2.0, size=n_kv * group)
    params = ScoringParams(budget=17)
    tri = _tri_inputs(method, n_kv * group, 6, seed=group)
    expected_kept, expected_scores = _brute_select(method, queries, keys, scale, params, sinks, tri=tri)
    kept = ref.select(method, queries, keys, scale, params, sinks, tri=tri)
    assert [row.tolist() for row in kept] == expected_kept
    if expected_scores is not None:
        got = ref.head_scores(method, queries, keys, scale, params, sinks, tri=tri)
        np.testing.assert_allclose(got, np.array(expected_scores), rtol=1e-10, atol=1e-12)
    assert ref.kept_sets_equivalent(method, queries, keys, scale, params, expected_kept, sinks=sinks, tri=tri)


def test_sink_takes_its_share_of_the_softmax():
    keys = np.zeros((2, 1, 2))
    keys[0, 0] = [1.0, 0.0]
    keys[1, 0] = [0.0, 1.0]
    queries = np.array([[[2.0, 0.0], [0.0, 0.0]]])  # query head 1 is flat
    sinks = np.array([-1.0, 3.0])  # the group's sink logit is the larger one
    imp = ref.importance(queries, keys, 1.0, 1, sinks=sinks)[0]
    denominator = math.exp(2.0) + math.exp(0.0) + math.exp(3.0)
    assert imp == pytest.approx([math.exp(2.0) / denominator, 1.0 / denominator])
    # no sink: the plain softmax over the candidates
    assert ref.importance(queries, keys, 1.0, 1)[0] == pytest.approx(
        [math.exp(2.0) / (math.exp(2.0) + 1.0), 1.0 / (math.exp(2.0) + 1.0)]
    )


def test_sinks_reweight_the_queries_and_change_the_selection():
    # query 0 is sure of token 0 (logits 8, 0, 0); query 1 leans to token 1 (10, 11, 0). Without a
    # sink each query hands out a whole unit of attention and token 0 wins; a sink logit of 9
    # swallows most of query 0's (small) logits but little of query 1's, so token 1 wins
    keys = np.zeros((4, 1, 2))
    keys[0, 0] = [1.0, 0.0]
    keys[1, 0] = [0.0, 1.0]
    queries = np.zeros((2, 1, 2))
    queries[0, 0] = [8.0, 0.0]
    queries[1, 0] = [10.0, 11.0]
    params = ScoringParams(budget=2, window=1, kernel=1)  # candidates 0..2, one kept; window: token 3
    assert ref.select("snapkv", queries, keys, 1.0, params)[0].tolist() == [0, 3]
    sinks = np.array([9.0])
    assert ref.select("snapkv", queries, keys, 1.0, params, sinks=sinks)[0].tolist() == [1, 3]
    scores = ref.head_scores("snapkv", queries, keys, 1.0, params, sinks=sinks)[0]
    q0 = np.exp([8.0, 0.0, 0.0, 9.0])
    q1 = np.exp([10.0, 11.0, 0.0, 9.0])
    assert scores == pytest.approx(((q0 / q0.sum())[:3] + (q1 / q1.sum())[:3]) / 2)


def test_sinks_must_match_the_query_heads():
    rng = np.random.default_rng(5)
    queries, keys, scale = _random_case(rng, 30, 4, 2)
    with pytest.raises(ValueError, match="sinks must be"):
        ref.select("rkv", queries, keys, scale, ScoringParams(budget=12), sinks=np.zeros(2))


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_raise():
    rng = np.random.default_rng(4)
    queries, keys, scale = _random_case(rng, 30, 4, 2)
    good = ScoringParams(budget=12)
    with pytest.raises(ValueError, match="unknown method"):
        ref.select("lru", queries, keys, scale, good)
    with pytest.raises(ValueError, match="must exceed window"):
        ref.select("rkv", queries, keys, scale, ScoringParams(budget=8))
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        ref.select("rkv", queries[:, :3], keys, scale, good)
    with pytest.raises(ValueError, match="head dim mismatch"):
        ref.select("rkv", queries[:, :, :4], keys, scale, good)
    with pytest.raises(ValueError, match="queries must be"):
        ref.select("rkv", queries[0], keys, scale, good)
    with pytest.raises(ValueError, match="keys must be"):
        ref.redundancy(keys[:, 0], 10, 0.5)
    with pytest.raises(ValueError, match="odd"):
        ref.select("snapkv", queries, keys, scale, ScoringParams(budget=12, kernel=4))
    with pytest.raises(ValueError, match="threshold"):
        ref.select("rkv", queries, keys, scale, ScoringParams(budget=12, threshold=-0.1))
    with pytest.raises(ValueError, match="sink"):
        ref.select("streamingllm", queries, keys, scale, ScoringParams(budget=10))
    with pytest.raises(ValueError, match="n_candidates"):
        ref.redundancy(keys, 31, 0.5)
    with pytest.raises(ValueError, match="expected 4"):
        ref.cutoff_ties(np.zeros(10), np.array([0, 1, 2]), 4)


def test_keydiff_keeps_the_keys_least_like_the_mean():
    """Twelve keys along one direction and four off it: the four are kept whatever the queries say."""
    rng = np.random.default_rng(11)
    keys = np.tile(np.array([1.0, 0.0, 0.0]), (24, 1, 1)) + 0.01 * rng.normal(size=(24, 1, 3))
    odd = [3, 9, 14, 15]
    keys[odd, 0] = [[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [0.2, -1.0, 0.3], [0.0, 0.7, 0.7]]
    queries = np.tile(np.array([1.0, 0.0, 0.0]), (8, 1, 1))   # would favour the common keys
    kept = ref.select("keydiff", queries, keys, 1.0, ScoringParams(budget=12))[0]
    assert kept.tolist() == odd + list(range(16, 24))
    # a key's scale does not matter, only its direction
    scaled = keys.copy()
    scaled[:16] *= rng.uniform(0.1, 10.0, size=(16, 1, 1))
    assert ref.select("keydiff", queries, scaled, 1.0, ScoringParams(budget=12))[0].tolist() == kept.tolist()
