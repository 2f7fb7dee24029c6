"""Tests for rkv_local.testing: tiny random-weight GGUF files llama.cpp loads."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGUFReader

from rkv_local.testing import make_tiny_model



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
    ],
)
def test_tiny_model_rejects_bad_shapes(tmp_path: Path, smollm2_path: Path, bad_args: dict) -> None:
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "bad.gguf", vocab_from=smollm2_path, **bad_args)
    assert not (tmp_path / "bad.gguf").exists()
