"""triattention in rkv_local/reference.py against a port of the authors' scorer.

The authors' code (github.com/WeianMao/triattention, triattention/methods/) needs torch and a
Hugging Face model, so below is a small numpy port of the path their paper runs took. It keeps
their layout (Hugging Face "half" pairs), their order of operations (invert the cached keys'
RoPE, then score the pre-RoPE keys) and their float32 arithmetic; the float64 variant of the same
port checks the formula without float32 rounding. Their 1e-6 tie-breaking noise is left out:
random data has no ties. No torch here.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

# loaded by path so the test does not depend on rkv_local/__init__.py (as in test_reference.py)
_PATH = pathlib.Path(__file__).resolve().parents[1] / "rkv_local" / "reference.py"
_SPEC = importlib.util.spec_from_file_location("rkv_reference_tri_authors", _PATH)
ref = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = ref  # dataclasses needs the module registered
_SPEC.loader.exec_module(ref)


# --------------------------------------------------------------------------------------------
# A port of the authors' scorer, following triattention/methods/pruning_utils.py: invert_rope,
# compute_frequency_statistics_from_means, score_keys_for_round and triattention.py's
# per_layer_perhead selection (_select_per_layer_perhead_independent). No tie-breaking noise.
# --------------------------------------------------------------------------------------------
def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _hf_cos_sin(positions: np.ndarray, omega: np.ndarray, s: float, dt: type) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face's rotary tables: angle = pos * inv_freq, duplicated over both halves, times s."""
    angle = positions.astype(dt)[:, None] * omega.astype(dt)
    emb = np.concatenate([angle, angle], axis=-1)
    return np.cos(emb) * dt(s), np.sin(emb) * dt(s)


def authors_raw_scores(keys_half: np.ndarray, positions: np.ndarray, t: int, q_mean_complex: np.ndarray,
                       q_abs_mean: np.ndarray, omega: np.ndarray, s: float, dt: type = np.float32) -> np.ndarray:
    """keys_half [n_kv, n, d]: cached (post-RoPE, times s) keys in HF half layout, at absolute
    positions [n]; t = the next query's position. Returns each query head's score, [n_q, n]."""
    n_kv, n, d = keys_half.shape
    n_q, f = q_mean_complex.shape
    cdt = np.complex64 if dt is np.float32 else np.complex128
    cos, sin = _hf_cos_sin(positions, omega, s, dt)
    # invert_rope ("half"): divide s out of the keys and the tables, rotate back by -p * omega
    base = keys_half.astype(dt) / dt(s)
    k_unrot = base * (cos / dt(s)) - _rotate_half(base) * (sin / dt(s))
    # compute_frequency_scaling: |(cos, sin)| at position 0, i.e. s for every pair; squared
    cos0, sin0 = _hf_cos_sin(np.zeros(1), omega, s, dt)
    freq_scale_sq = (np.sqrt(cos0[0, 0::2] ** 2 + sin0[0, 0::2] ** 2) ** 2)[:f]
    offsets = (2.0 ** np.arange(17)).astype(dt)                     # build_geometric_offsets(65536)
    delta = (dt(t) - positions.astype(dt))[:, None] + offsets[None, :]  # [n, 17]
    raw = np.empty((n_q, n), dtype=dt)
    for h in range(n_q):
        k = k_unrot[h // (n_q // n_kv)]
        # compute_frequency_statistics_from_means (to_complex_pairs "half": real = x[:d/2], imag = x[d/2:])
        kc = (k[:, :f] + 1j * k[:, f:]).astype(cdt)
        qm = q_mean_complex[h].astype(cdt)
        relative = qm[None, :] * np.conj(kc)
        phi = np.arctan2(relative.imag, relative.real)
        amp = np.abs(qm)[None, :] * np.abs(kc)
        extra = (q_abs_mean[h].astype(dt) - np.abs(qm))[None, :] * np.abs(kc)
        # score_keys_for_round, aggregation "mean"
        phase = delta[:, :, None] * omega.astype(dt)[None, None, :] + phi[:, None, :]
        trig = (amp[:, None, :] * freq_scale_sq * np.cos(phase)).sum(axis=2)
        additive = (extra * freq_scale_sq).sum(axis=1, keepdims=True)
        raw[h] = (trig + additive).mean(axis=1)
    return raw


def authors_keep(raw: np.ndarray, n_kv: int, keep: int) -> list[set[int]]:
    """normalize_scores (z-score per query head, population std, floor 1e-6), MAX over each KV
    head's query heads, top-k per KV head of one layer."""
    z = (raw - raw.mean(axis=1, keepdims=True)) / np.maximum(raw.std(axis=1, keepdims=True), 1e-6)
    group = z.reshape(n_kv, -1, z.shape[1]).max(axis=1)
    return [set(np.argsort(-row, kind="stable")[:keep].tolist()) for row in group]


# --------------------------------------------------------------------------------------------
# Cases: real shapes, random calibration statistics and keys
# --------------------------------------------------------------------------------------------
def llama3_inv_freq(d: int, base: float, factor: float = 8.0, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0, original_max_position: int = 8192) -> np.ndarray:
    """Hugging Face's "llama3" rope_type (float64): long wavelengths are divided by factor, short
    ones kept, the band between interpolated smoothly."""
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    wavelen = 2 * np.pi / inv
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    out = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > low_freq_wavelen, inv / factor, out)
    return np.where(wavelen < high_freq_wavelen, inv, out)


# llama.cpp holds llama3 scaling as rope_freqs: the factors that divide the default frequencies
_LLAMA3_FACTORS = tuple(500000.0 ** (-np.arange(0, 128, 2) / 128) / llama3_inv_freq(128, 500000.0))

CASES = {  # name: (n_head, n_head_kv, Rope)
    "qwen7b_neox": (28, 4, ref.Rope(n_rot=128, neox=True, freq_base=10000.0)),
    "llama3_normal": (32, 8, ref.Rope(n_rot=128, neox=False, freq_base=500000.0, freq_factors=_LLAMA3_FACTORS)),
    "yarn_neox": (16, 2, ref.Rope(n_rot=128, neox=True, freq_base=1e6, freq_scale=0.25, ext_factor=1.0,
                                   n_ctx_orig=4096)),
}


def _to_half(x: np.ndarray, rope: ref.Rope) -> np.ndarray:
    """Our layout -> the authors' (HF) half layout: NEOX is already it; llama.cpp's normal RoPE
    pairs (2f, 2f+1), which HF's permuted q/k weights hold as (f, f + d/2)."""
    return x if rope.neox else np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _make_case(name: str, n_tok: int = 300, seed: int = 0):
    n_head, n_kv, rope = CASES[name]
    d = rope.n_rot
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((n_head, d)) * rng.uniform(0.2, 3.0, (n_head, 1))
    abs_mean = rope.pair_moduli(centre) + rng.uniform(0.0, 2.0, (n_head, d // 2))   # E|q_f| >= |E q_f|
    t = int(rng.integers(20000, 30000))
    positions = np.sort(rng.choice(t - 1, n_tok - 1, replace=False)).astype(np.float64)
    positions = np.append(positions, t - 1)                                        # newest key at t - 1
    pre_rope = rng.standard_normal((n_tok, n_kv, d)) * rng.uniform(0.5, 2.0, (n_tok, 1, 1))
    keys = rope.rotate(pre_rope, positions)                                         # as cached
    tri = ref.TriAttentionInputs(stats=ref.QueryStats(centre=centre, abs_mean=abs_mean), rope=rope, position=t)
    return keys, positions, tri


def _authors_on(keys: np.ndarray, positions: np.ndarray, tri: ref.TriAttentionInputs, dt: type) -> np.ndarray:
    rope = tri.rope
    omega, s = rope.frequencies()   # for llama3/YaRN the authors take HF's tables; here our angles and s
    centre = _to_half(tri.stats.centre, rope)
    q_mean_complex = centre[:, : rope.n_rot // 2] + 1j * centre[:, rope.n_rot // 2:]
    keys_half = np.moveaxis(_to_half(keys, rope), 1, 0)                            # [n_kv, n, d]
    return authors_raw_scores(keys_half, positions, tri.position, q_mean_complex, tri.stats.abs_mean, omega, s, dt)


@pytest.mark.parametrize("name", list(CASES))
def test_query_scores_match_authors(name: str) -> None:
    keys, positions, tri = _make_case(name)
    ours = ref.triattention_query_scores(keys, keys.shape[0], tri)
    spread = ours.std(axis=1, keepdims=True)
    exact = _authors_on(keys, positions, tri, np.float64)
    assert (np.abs(ours - exact) / spread).max() < 1e-9          # the formula: measured ~1e-12
    # their float32: phases (t - p + 2^16) * omega near 1e5 rad carry up to ~5e-3 rad of rounding,
    # so a few scores move by ~4e-4 of the spread (measured); typical ones by ~2e-5
    theirs = _authors_on(keys, positions, tri, np.float32).astype(np.float64)
    assert (np.abs(ours - theirs) / spread).max() < 1e-3
    assert np.median(np.abs(ours - theirs) / spread) < 1e-4


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("window", [0, 16])
def test_selection_matches_authors_per_layer_perhead(name: str, window: int) -> None:
    keys, positions, tri = _make_case(name, seed=1)
    n_kv, budget = keys.shape[1], 128
    params = ref.ScoringParams(budget=budget, window=window)
    queries = np.zeros((1, tri.stats.centre.shape[0], keys.shape[2]))               # triattention reads none
    ours = ref.select("triattention", queries, keys, 1.0, params, tri=tri)
    n_cand = keys.shape[0] - window              # the authors score only the candidates
    for dt in (np.float64, np.float32):
        raw = _authors_on(keys[:n_cand], positions[:n_cand], tri, dt).astype(np.float64)
        theirs = authors_keep(raw, n_kv, budget - window)
        kept = [sorted(c | set(range(n_cand, keys.shape[0]))) for c in theirs]
        if dt is np.float64:
            assert [set(k.tolist()) for k in ours] == [set(k) for k in kept]
        else:   # float32 rounding may swap candidates lying within ~1e-3 of the cut-off
            assert ref.kept_sets_equivalent("triattention", queries, keys, 1.0, params, kept, rtol=1e-3, tri=tri)


def test_llama3_freq_factors_reproduce_hf_inv_freq() -> None:
    theta, s = CASES["llama3_normal"][2].frequencies()
    inv = llama3_inv_freq(128, 500000.0)
    np.testing.assert_allclose(theta, inv, rtol=1e-12)
    assert s == 1.0
    assert inv[0] == 1.0 and np.isclose(inv[-1], 500000.0 ** (-126 / 128) / 8)    # short kept, long / 8


@pytest.mark.parametrize("name", list(CASES))
def test_rope_round_trip_and_hf_rotation(name: str) -> None:
    rope = CASES[name][2]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3, rope.n_rot))
    positions = rng.integers(0, 30000, 50).astype(np.float64)
    rotated = rope.rotate(x, positions)
    np.testing.assert_allclose(rope.unrotate(rotated, positions), x, rtol=0, atol=1e-9)
    omega, s = rope.frequencies()
    cos, sin = _hf_cos_sin(positions, omega, s, np.float64)
    half = _to_half(x, rope)
    hf = half * cos[:, None] + _rotate_half(half) * sin[:, None]   # HF apply_rotary_pos_emb
    np.testing.assert_allclose(_to_half(rotated, rope), hf, rtol=0, atol=1e-9)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_authors_hand_traced_example(base: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC §9: d = 2, omega = 1 (n_rot = 2: base^0), s = 1, E q = 1, E|q| = 1.5, pre-RoPE key
    (0, 1) at p = 0, t = 1: amp 1, phi = -pi/2, extra 0.5, so S = mean_j sin(1 + o_j) + 0.5."""
    rope = ref.Rope(n_rot=2, neox=True, freq_base=base)
    tri = ref.TriAttentionInputs(ref.QueryStats(centre=np.array([[1.0, 0.0]]), abs_mean=np.array([[1.5]])), rope, 1)
    keys = rope.rotate(np.array([[[0.0, 1.0]]]), np.array([0.0]))
    full = ref.triattention_query_scores(keys, 1, tri)[0, 0]
    assert full == pytest.approx(np.mean(np.sin(1 + 2.0 ** np.arange(17))) + 0.5, abs=1e-12)
    monkeypatch.setattr(ref, "TRI_OFFSETS", np.array([1.0, 2.0]))     # the trace's offsets {1, 2}
    assert ref.triattention_query_scores(keys, 1, tri)[0, 0] == pytest.approx(1.025209, abs=5e-7)
