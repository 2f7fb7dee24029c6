"""triattention on the engine: calibration (the model's own pre-RoPE queries), the engine's selections
against the spec (rkv_local/reference.py) on normal and NEOX RoPE, quantized caches, automatic
compressions, a kept prompt and parallel sequences, and the refusals."""
from __future__ import annotations

import numpy as np
import pytest

from rkv_local import BatchedLlama, Llama, calibration, reference
from engine_helpers import (GGML_TYPES, SpecWatch, TinyLlamaWeights, greedy, random_tokens, shape_of,
                            triattention_matches_reference)

BUDGET, BUFFER, WINDOW = 40, 16, 8
TEXT = " ".join(f"step {i}: the sum of {i} and {2 * i + 1} is {3 * i + 1}." for i in range(400))


@pytest.fixture(scope="module")
def calibrated(tiny_model, tmp_path_factory):
    """Factory: (model path, its calibration file) for a tiny model of the given shape."""
    made = {}

    def make(**shape):
        key = tuple(sorted(shape.items()))
        if key not in made:
            path = tiny_model(**shape)
            out = tmp_path_factory.mktemp("calibration") / "tri.npz"
            calibration.calibrate(path, text=TEXT, n_tokens=256, progress=False, n_threads=2).save(out)
            made[key] = (path, out)
        return made[key]

    return make


def tri_llama(path, cal, **kw) -> Llama:
    kw = dict(kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW, n_threads=2, verbose=False) | kw
    return Llama(str(path), kv_method="triattention", kv_calibration=str(cal), **kw)


def test_calibration_is_the_mean_pre_rope_query(tiny_model, tmp_path):
    """Against an independent float64 forward of the tiny llama (its own RoPE, rotated back)."""
    path = tiny_model(arch="llama", n_head=4, n_head_kv=2, head_dim=32)
    cal = calibration.calibrate(path, text=TEXT, n_tokens=128, progress=False, n_threads=2)
    assert cal.n_tokens == 128 and cal.layers == (0, 1)
    llm = Llama(str(path), n_ctx=256, verbose=False)
    tokens = llm.tokenize(TEXT.encode(), add_bos=True)[:128]
    llm.close()
    weights = TinyLlamaWeights.load(path)
    queries: list = []
    weights.forward(tokens, lambda layer, h, i: np.arange(i + 1), queries=queries)
    pos = np.arange(128, dtype=np.float64)
    for layer in cal.layers:
        pre = weights._rope(queries[layer], -pos)
        np.testing.assert_allclose(cal.centres[layer], pre.mean(axis=0), rtol=2e-2, atol=2e-3)
        moduli = np.hypot(pre[..., 0::2], pre[..., 1::2]).mean(axis=0)   # llama: pairs (2i, 2i+1)
        np.testing.assert_allclose(cal.abs_means[layer], moduli, rtol=2e-2, atol=2e-3)
    # saved and loaded unchanged; refused for another model
    saved = Calibration_roundtrip(cal, tmp_path / "c.npz")
    np.testing.assert_array_equal(saved.centres, cal.centres.astype(np.float32))
    other = tiny_model(arch="llama", n_head=4, n_head_kv=2, head_dim=32, seed=5)
    with pytest.raises(ValueError, match="another model"):
        Llama(str(other), kv_budget=BUDGET, kv_buffer=BUFFER, kv_method="triattention",
              kv_calibration=str(tmp_path / "c.npz"), verbose=False)


def Calibration_roundtrip(cal, path):
    cal.save(path)
    return calibration.Calibration.load(path)


@pytest.mark.parametrize("arch,n_head,n_head_kv,head_dim,type_kv,flash_attn", [
    ("llama", 4, 2, 32, "f16", False),     # normal RoPE: pairs (2i, 2i+1)
    ("qwen2", 8, 2, 32, "q8_0", True),     # NEOX: pairs (i, i + d/2)
    ("qwen3", 4, 1, 64, "bf16", True),
    ("llama", 9, 3, 64, "f32", False),     # SmolLM2's heads
    ("qwen2", 7, 1, 128, "f16", True),     # R1-Distill-Qwen-7B's groups of 7, heads of 128
    ("llama", 8, 2, 128, "q8_0", False),   # R1-Distill-Llama-8B's groups of 4
])
def test_native_selection_equals_reference(calibrated, arch, n_head, n_head_kv, head_dim, type_kv, flash_attn):
    path, cal = calibrated(arch=arch, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim)
    llm = tri_llama(path, cal, type_k=GGML_TYPES[type_kv],
                    type_v=GGML_TYPES[type_kv] if flash_attn else GGML_TYPES["f16"], flash_attn=flash_attn)
    llm.eval(random_tokens(BUDGET + BUFFER, seed=3))
    assert triattention_matches_reference(llm, BUDGET, WINDOW) == 0
    for round_ in range(3):   # later rounds score caches that already hold per-head tokens
        greedy(llm, BUFFER)
        assert triattention_matches_reference(llm, BUDGET, WINDOW) == 0, f"round {round_ + 2}"


def test_automatic_compressions_and_a_kept_prompt(calibrated):
    path, cal = calibrated(arch="qwen2", n_head=8, n_head_kv=2, head_dim=32)
    llm = tri_llama(path, cal, kv_keep_prompt=24)
    watch = SpecWatch(llm._ctx.ctx, "triattention", shape_of(llm._model.model),
                      reference.ScoringParams(budget=BUDGET, window=WINDOW), calibration=llm._kv_calibration)
    llm.create_completion(random_tokens(20, seed=4), max_tokens=5 * (BUDGET + BUFFER), temperature=0.0,
                          logit_bias={t: -1e9 for t in range(0, 8)})
    watch.close()
    assert not watch.failures, watch.failures[:3]
    assert watch.compared == llm.kv_stats().compressions >= 4
    assert llm.kv_stats().cells_kept == 20   # the prompt, whole


def test_parallel_sequences_select_as_the_spec(calibrated):
    path, cal = calibrated(arch="llama", n_head=4, n_head_kv=2, head_dim=32)
    with BatchedLlama(path, n_seq_max=3, kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW,
                      kv_method="triattention", kv_calibration=str(cal), n_threads=2) as batch:
        watch = SpecWatch(batch._ctx.ctx, "triattention", shape_of(batch._proto._model.model),
                          reference.ScoringParams(budget=BUDGET, window=WINDOW), calibration=batch._proto._kv_calibration)
        texts = batch.generate_batch(["one two", "three four five", "six"], max_tokens=3 * (BUDGET + BUFFER),
                                     temperature=0.0)
        watch.close()
    assert len(texts) == 3 and not watch.failures, watch.failures[:3]
    assert watch.compared >= 6


def test_refusals(tiny_model, calibrated, tmp_path, monkeypatch):
    path, cal = calibrated(arch="llama", n_head=4, n_head_kv=2, head_dim=32)
    with pytest.raises(ValueError, match="kv_calibration is triattention's"):
        Llama(str(path), kv_budget=BUDGET, kv_method="rkv", kv_calibration=str(cal), verbose=False)
    with pytest.raises(ValueError, match="no calibration file"):
        Llama(str(path), kv_budget=BUDGET, kv_method="triattention", kv_calibration=str(tmp_path / "x.npz"),
              verbose=False)
    (tmp_path / "bad.npz").write_bytes(b"not a calibration")
    with pytest.raises(ValueError, match="not an rkv-local triattention calibration"):
        Llama(str(path), kv_budget=BUDGET, kv_method="triattention", kv_calibration=str(tmp_path / "bad.npz"),
              verbose=False)
    with pytest.raises(TypeError, match="kv_calibration"):
        Llama(str(path), kv_budget=BUDGET, kv_calibraton=str(cal), verbose=False)


def test_without_a_file_it_calibrates_once_and_caches(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RKV_LOCAL_CACHE", str(tmp_path))
    path = tiny_model(arch="llama", n_head=4, n_head_kv=2, head_dim=32, n_ctx_train=512)
    with pytest.warns(RuntimeWarning, match="calibrating"):
        llm = Llama(str(path), kv_budget=BUDGET, kv_buffer=BUFFER, kv_method="triattention", n_threads=2, verbose=False)
    cached = list((tmp_path / "calibration").glob("*.npz"))
    assert len(cached) == 1 and llm._kv_calibration.n_tokens == 384   # the training context, less two chunks
    llm.close()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama(str(path), kv_budget=BUDGET, kv_buffer=BUFFER, kv_method="triattention", verbose=False).close()


def test_the_calibrate_command(tiny_model, tmp_path, capsys):
    from rkv_local.cli import main

    path = tiny_model(arch="qwen2", n_head=8, n_head_kv=2, head_dim=32)
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "cal.npz"
    assert main(["calibrate", str(path), "--data", str(tmp_path / "text.txt"), "--tokens", "128", "--out", str(out),
                 "--n-threads", "2"]) == 0
    cal = calibration.Calibration.load(out)
    assert cal.n_tokens == 128 and cal.source == "text" and cal.centres.shape == (2, 8, 32)
    assert "2 layers calibrated on 128 tokens" in capsys.readouterr().err
    assert main(["calibrate", str(path), "--out", str(tmp_path / "cal.bin")]) != 0
    assert main(["generate", str(path), "x", "--kv-budget", "40", "--kv-calibration", str(out)]) != 0
    assert "--kv-calibration is for --kv-method triattention" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [
    dict(arch="gemma3", n_layer=6, n_head=4, n_head_kv=2, head_dim=32, sliding_window=32),   # window layers
    dict(arch="gpt-oss", n_layer=4, n_head=4, n_head_kv=2, head_dim=32, sliding_window=32),  # YaRN RoPE, sinks
], ids=["gemma3-iswa", "gpt-oss"])
def test_sliding_window_models_select_as_the_spec(calibrated, shape):
    path, cal = calibrated(**shape)
    llm = tri_llama(path, cal)
    watch = SpecWatch(llm._ctx.ctx, "triattention", shape_of(llm._model.model),
                      reference.ScoringParams(budget=BUDGET, window=WINDOW), layers=llm.compressed_layers(),
                      calibration=llm._kv_calibration)
    llm.eval(random_tokens(20, seed=6))
    greedy(llm, 4 * (BUDGET + BUFFER))
    watch.close()
    assert not watch.failures, watch.failures[:3]
    assert watch.compared == llm.kv_stats().compressions >= 4
