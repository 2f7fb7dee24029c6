"""Tests for rkv_local.testing: tiny random-weight GGUF files llama.cpp loads."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGUFReader

from rkv_local import Llama
from rkv_local.testing import make_tiny_model, sliding_window_layers


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"missing key {key}"
    return field.contents()


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path: Path) -> GGUFReader:
    return GGUFReader(smollm2_path)  # parsing the real vocabulary takes seconds; do it once


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_model_metadata_and_shapes(
    arch: str, tiny_model: Callable[..., Path], smollm2_reader: GGUFReader
) -> None:
    n_layer, n_head, n_head_kv, head_dim, n_ff = 3, 6, 2, 16, 80
    path = tiny_model(arch=arch, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff)
    reader = GGUFReader(path)
    vocab = smollm2_reader
    n_embd, n_embd_kv = n_head * head_dim, n_head_kv * head_dim
    n_vocab = len(vocab.get_field("tokenizer.ggml.tokens").data)

    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.block_count") == n_layer
    assert _field(reader, f"{arch}.embedding_length") == n_embd
    assert _field(reader, f"{arch}.feed_forward_length") == n_ff
    assert _field(reader, f"{arch}.attention.head_count") == n_head
    assert _field(reader, f"{arch}.attention.head_count_kv") == n_head_kv
    assert _field(reader, f"{arch}.attention.key_length") == head_dim
    assert _field(reader, f"{arch}.context_length") == 4096

    # The tokenizer is copied verbatim from the vocabulary source.
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert _field(reader, key) == _field(vocab, key)
    assert _field(reader, "tokenizer.ggml.tokens")[:300] == _field(vocab, "tokenizer.ggml.tokens")[:300]
    assert len(reader.get_field("tokenizer.ggml.merges").data) == len(vocab.get_field("tokenizer.ggml.merges").data)

    # GGUFReader reports shapes in ggml order: (n_in, n_out).
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["token_embd.weight"] == (n_embd, n_vocab)
    assert "output.weight" not in shapes  # tied to the embedding
    for i in range(n_layer):
        assert shapes[f"blk.{i}.attn_q.weight"] == (n_embd, n_embd)
        assert shapes[f"blk.{i}.attn_k.weight"] == (n_embd, n_embd_kv)
        assert shapes[f"blk.{i}.attn_v.weight"] == (n_embd, n_embd_kv)
        assert shapes[f"blk.{i}.attn_output.weight"] == (n_embd, n_embd)
        assert shapes[f"blk.{i}.ffn_gate.weight"] == (n_embd, n_ff)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (n_ff, n_embd)
        has_bias = f"blk.{i}.attn_k.bias" in shapes
        has_qk_norm = f"blk.{i}.attn_k_norm.weight" in shapes
        assert has_bias == (arch == "qwen2")
        assert has_qk_norm == (arch == "qwen3")
        if has_bias:
            assert shapes[f"blk.{i}.attn_q.bias"] == (n_embd,)
            assert shapes[f"blk.{i}.attn_k.bias"] == (n_embd_kv,)
        if has_qk_norm:
            assert shapes[f"blk.{i}.attn_q_norm.weight"] == (head_dim,)
            assert shapes[f"blk.{i}.attn_k_norm.weight"] == (head_dim,)


def test_tiny_model_weights_are_finite_and_modest(tiny_model: Callable[..., Path]) -> None:
    reader = GGUFReader(tiny_model(arch="qwen3"))
    for tensor in reader.tensors:
        data = np.asarray(tensor.data, dtype=np.float32)
        assert np.all(np.isfinite(data)), tensor.name
        assert float(np.abs(data).max()) < 10.0, tensor.name
        if tensor.name.endswith("norm.weight"):
            assert np.all(data == 1.0), tensor.name


def test_tiny_model_is_deterministic(tmp_path: Path, smollm2_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a.gguf", arch="qwen2", seed=7, vocab_from=smollm2_path)
    second = make_tiny_model(tmp_path / "b.gguf", arch="qwen2", seed=7, vocab_from=smollm2_path)
    other_seed = make_tiny_model(tmp_path / "c.gguf", arch="qwen2", seed=8, vocab_from=smollm2_path)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != other_seed.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]  # no temp files left


def test_tiny_model_factory_caches_per_argument_set(tiny_model: Callable[..., Path]) -> None:
    assert tiny_model() == tiny_model(arch="llama", n_head=4)
    assert tiny_model(arch="llama") != tiny_model(arch="llama", seed=1)


@pytest.mark.parametrize(
    "bad_args",
    [
        {"n_head": 6, "n_head_kv": 4},  # GQA needs n_head % n_head_kv == 0
        {"arch": "gpt2"},
        {"head_dim": 15},
        {"n_layer": 0},
        {"arch": "llama", "sliding_window": 16},  # no sliding-window layers
        {"arch": "qwen3", "swa_pattern": 2},
        {"arch": "gemma3", "sliding_window": 0},
        {"arch": "gpt-oss", "swa_pattern": -1},
        {"arch": "gemma3", "swa_pattern": [True, False, True]},  # one bool per layer (2)
        {"arch": "gemma3", "swa_pattern": [1, 0]},
        {"arch": "gpt-oss", "swa_pattern": 1},  # no sliding-window layer: llama.cpp would abort
        {"arch": "gemma3", "swa_pattern": [False, False]},
    ],
)
def test_tiny_model_rejects_bad_shapes(tmp_path: Path, smollm2_path: Path, bad_args: dict) -> None:
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "bad.gguf", vocab_from=smollm2_path, **bad_args)
    assert not (tmp_path / "bad.gguf").exists()


# --- Interleaved sliding-window archs (gpt-oss, gemma3) ---------------------------------------

_ISWA_CASES = [  # (arch, make_tiny_model arguments, sliding-window layers)
    ("gpt-oss", {}, (True, False)),
    ("gemma3", {"n_layer": 6}, (True, True, True, True, True, False)),
    ("gemma3", {"n_layer": 3, "swa_pattern": [False, True, False]}, (False, True, False)),
]
_ISWA_IDS = ["gpt-oss", "gemma3-6-layers", "gemma3-pattern"]


def _tensor_shapes(reader: GGUFReader) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}  # ggml order


@pytest.mark.parametrize(("arch", "kwargs", "swa"), _ISWA_CASES[:2], ids=_ISWA_IDS[:2])
def test_tiny_iswa_model_tensors_and_metadata(
    arch: str, kwargs: dict, swa: tuple, tiny_model: Callable[..., Path]
) -> None:
    reader = GGUFReader(tiny_model(arch=arch, **kwargs))  # the default sizes:
    n_layer, n_head, n_head_kv, head_dim, n_ff = len(swa), 4, 2, 32, 512
    n_embd, n_embd_kv = n_head * head_dim, n_head_kv * head_dim
    n_vocab = len(reader.get_field("tokenizer.ggml.tokens").data)
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, f"{arch}.attention.sliding_window") == 32
    assert reader.get_field(f"{arch}.attention.sliding_window_pattern") is None  # the arch's default
    assert _field(reader, f"{arch}.attention.key_length") == head_dim

    expected = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,),
                "output.weight": (n_embd, n_vocab)}
    for i in range(n_layer):
        block = {
            "attn_norm.weight": (n_embd,),
            "attn_q.weight": (n_embd, n_embd),
            "attn_k.weight": (n_embd, n_embd_kv),
            "attn_v.weight": (n_embd, n_embd_kv),
            "attn_output.weight": (n_embd, n_embd),
            "post_attention_norm.weight": (n_embd,),
        }
        if arch == "gpt-oss":
            n_expert = 4
            block |= {
                "attn_q.bias": (n_embd,), "attn_k.bias": (n_embd_kv,), "attn_v.bias": (n_embd_kv,),
                "attn_output.bias": (n_embd,),
                "attn_sinks.weight": (n_head,),
                "ffn_gate_inp.weight": (n_embd, n_expert), "ffn_gate_inp.bias": (n_expert,),
                "ffn_gate_exps.weight": (n_embd, n_ff, n_expert), "ffn_gate_exps.bias": (n_ff, n_expert),
                "ffn_up_exps.weight": (n_embd, n_ff, n_expert), "ffn_up_exps.bias": (n_ff, n_expert),
                "ffn_down_exps.weight": (n_ff, n_embd, n_expert), "ffn_down_exps.bias": (n_embd, n_expert),
            }
        else:
            block |= {
                "attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,),
                "ffn_norm.weight": (n_embd,),
                "ffn_gate.weight": (n_embd, n_ff), "ffn_up.weight": (n_embd, n_ff), "ffn_down.weight": (n_ff, n_embd),
                "post_ffw_norm.weight": (n_embd,),
            }
        expected |= {f"blk.{i}.{name}": shape for name, shape in block.items()}
    assert _tensor_shapes(reader) == expected
    if arch == "gpt-oss":
        assert _field(reader, "gpt-oss.expert_count") == 4
        assert _field(reader, "gpt-oss.expert_used_count") == 2
        assert _field(reader, "gpt-oss.expert_feed_forward_length") == n_ff


def test_tiny_iswa_sliding_window_metadata(tiny_model: Callable[..., Path]) -> None:
    def metadata(arch: str, **kwargs) -> tuple:
        reader = GGUFReader(tiny_model(arch=arch, **kwargs))
        pattern = reader.get_field(f"{arch}.attention.sliding_window_pattern")
        return _field(reader, f"{arch}.attention.sliding_window"), pattern and pattern.contents()

    assert metadata("gpt-oss", sliding_window=16, swa_pattern=3) == (16, 3)
    arch, kwargs, _ = _ISWA_CASES[2]
    assert metadata(arch, **kwargs) == (32, [False, True, False])
    assert sliding_window_layers("gpt-oss", 4) == (True, False, True, False)
    assert sliding_window_layers("gemma3", 7) == (True,) * 5 + (False, True)
    assert sliding_window_layers("gemma3", 4, swa_pattern=3) == (True, True, False, True)
    assert sliding_window_layers("gemma3", 2, swa_pattern=[False, True]) == (False, True)
    assert sliding_window_layers("qwen3", 2) == (False, False)


@pytest.mark.parametrize("arch", ["gpt-oss", "gemma3"])
def test_tiny_iswa_model_is_deterministic(arch: str, tmp_path: Path, smollm2_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a.gguf", arch=arch, seed=3, vocab_from=smollm2_path)
    second = make_tiny_model(tmp_path / "b.gguf", arch=arch, seed=3, vocab_from=smollm2_path)
    wider = make_tiny_model(tmp_path / "c.gguf", arch=arch, seed=3, sliding_window=48, vocab_from=smollm2_path)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != wider.read_bytes()


def _prompt(llm: Llama) -> list[int]:
    return llm.tokenize(
        b"Once upon a time a small fox crossed the frozen river to find food for the winter. Her "
        b"brothers stayed behind in the den, arguing about whose turn it was to watch the owls, "
        b"while the old badger next door counted his mushrooms twice."
    )


@pytest.mark.parametrize(("arch", "kwargs", "swa"), _ISWA_CASES, ids=_ISWA_IDS)
def test_tiny_iswa_model_generates(arch: str, kwargs: dict, swa: tuple, tiny_model: Callable[..., Path]) -> None:
    llm = Llama(str(tiny_model(arch=arch, **kwargs)), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    prompt = _prompt(llm)
    assert len(prompt) > 40  # longer than the 32-token window
    llm.eval(prompt)
    answer = []
    for _ in range(48):
        answer.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([answer[-1]])
    logits = np.asarray(llm.scores[: llm.n_tokens], dtype=np.float64)
    assert np.all(np.isfinite(logits))
    assert np.all(logits.std(axis=1) > 0.3)  # not flat
    # Each position has its own distribution, and most are unlike each other.
    for i in range(len(logits) - 1):
        assert np.abs(logits[i + 1:] - logits[i]).max(axis=1).min() > 0.1, i
    rows = logits - logits.mean(axis=1, keepdims=True)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    similarity = rows @ rows.T
    n = len(rows)
    assert (similarity.sum() - n) / (n * n - n) < 0.5
    assert len(set(answer)) >= 16, answer  # greedy answer does not get stuck on a token


@pytest.mark.parametrize(("arch", "kwargs", "swa"), _ISWA_CASES, ids=_ISWA_IDS)
def test_tiny_iswa_model_gets_an_iswa_cache(
    arch: str, kwargs: dict, swa: tuple, tiny_model: Callable[..., Path], capfd: pytest.CaptureFixture
) -> None:
    path = tiny_model(arch=arch, **kwargs)
    assert sliding_window_layers(arch, len(swa), kwargs.get("swa_pattern")) == swa
    capfd.readouterr()
    Llama(str(path), n_ctx=64, n_threads=1, verbose=True)
    log = capfd.readouterr()
    caches: dict[str, set[int]] = {}
    section = None
    for line in (log.out + log.err).splitlines():
        if match := re.search(r"creating +(non-SWA|SWA) KV cache", line):
            section = caches.setdefault(match.group(1), set())
        elif section is not None and (match := re.search(r"llama_kv_cache: layer +(\d+): dev = ", line)):
            section.add(int(match.group(1)))
    assert caches == {
        "non-SWA": {i for i, slides in enumerate(swa) if not slides},
        "SWA": {i for i, slides in enumerate(swa) if slides},
    }


def test_tiny_gpt_oss_sinks_matter(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    path = tiny_model(arch="gpt-oss")
    sinks = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(path).tensors
             if t.name.endswith("attn_sinks.weight")}
    assert sorted(sinks) == ["blk.0.attn_sinks.weight", "blk.1.attn_sinks.weight"]
    values = np.concatenate(list(sinks.values()))
    assert values.shape == (8,) and np.all(np.isfinite(values))
    # A key of score 1 adds e^1 to the softmax denominator: a sink above 4 weighs as much
    # as 20 such keys, one near 1 as much as a single key; both kinds are there.
    assert values.max() > 4.0 and values.min() < 1.5 and values.std() > 1.0

    def logits(model: Path) -> np.ndarray:
        llm = Llama(str(model), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
        llm.eval(_prompt(llm))
        return np.asarray(llm.scores[: llm.n_tokens], dtype=np.float64)

    without = tmp_path / "no-sinks.gguf"
    shutil.copyfile(path, without)
    reader = GGUFReader(without, "r+")
    for tensor in reader.tensors:
        if tensor.name.endswith("attn_sinks.weight"):
            tensor.data[:] = -30.0  # e^-30: no weight in the softmax
    del reader
    with_sinks, without_sinks = logits(path), logits(without)
    # Past the 32-token window and early on alike, the sinks change what the model says.
    for pos in (3, 40, len(with_sinks) - 1):
        assert np.abs(with_sinks[pos] - without_sinks[pos]).max() > 1.0
    assert np.mean(with_sinks.argmax(axis=1) == without_sinks.argmax(axis=1)) < 0.5


def test_shared_layers_draw_one_layer_for_all(tiny_model: Callable[..., Path]) -> None:
    """Models of real sizes for speed measurements (scripts/gpu_check.sh): every layer the same weights,
    drawn once; the file and its shapes as without."""
    shared = GGUFReader(str(tiny_model(arch="llama", n_layer=3, shared_layers=True)))
    plain = GGUFReader(str(tiny_model(arch="llama", n_layer=3)))
    by_name = {t.name: np.asarray(t.data) for t in shared.tensors}
    assert [(t.name, tuple(t.shape)) for t in shared.tensors] == [(t.name, tuple(t.shape)) for t in plain.tensors]
    for name in ("attn_q.weight", "ffn_down.weight"):
        np.testing.assert_array_equal(by_name[f"blk.0.{name}"], by_name[f"blk.2.{name}"])
    plain_q = {t.name: np.asarray(t.data) for t in plain.tensors if t.name.endswith("attn_q.weight")}
    assert not np.array_equal(plain_q["blk.0.attn_q.weight"], plain_q["blk.2.attn_q.weight"])
