"""Shared fixtures: real and tiny GGUF models.

Deliberately free of llama_cpp imports: collecting tests must not need the
native library.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from rkv_local.models import fetch
from rkv_local.testing import make_tiny_model

_TINY_MODEL_SIGNATURE = inspect.signature(make_tiny_model)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-steps", type=int, default=0, metavar="N",
                     help="steps of each random-operation fuzz case (default: the suite's own, about 1,000 in all)")
    parser.addoption("--fuzz-seed", type=int, default=1234, metavar="S", help="first seed of the fuzz cases")


# Offline (scripts/gpu_check.sh on the GPU machine) only SmolLM2's tokenizer is at hand, in a GGUF of
# its own: tiny models take their vocabulary from it, and tests that need SmolLM2's weights skip.
VOCAB_ONLY = os.environ.get("RKV_TEST_VOCAB")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), fetched once into the user's model cache."""
    if VOCAB_ONLY:
        pytest.skip("SmolLM2's weights are not here (RKV_TEST_VOCAB: its tokenizer only)")
    return fetch("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_model(arch="qwen3", n_head=8, ...)`` -> path of a random GGUF.

    Accepts the keyword arguments of ``make_tiny_model`` (except ``path``);
    the vocabulary defaults to SmolLM2's.  Each distinct argument set is
    written once per session.
    """
    folder = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs: Any) -> Path:
        kwargs.setdefault("vocab_from", Path(VOCAB_ONLY) if VOCAB_ONLY else fetch("smollm2-135m"))
        # Normalise through the signature so explicit defaults share a cache entry.
        bound = _TINY_MODEL_SIGNATURE.bind(None, arch, **kwargs)
        bound.apply_defaults()
        arguments = {k: v for k, v in bound.arguments.items() if k != "path"}
        key = repr(sorted((k, str(v)) for k, v in arguments.items()))
        if key not in made:
            digest = hashlib.sha256(key.encode()).hexdigest()[:16]
            made[key] = make_tiny_model(folder / f"tiny-{arch}-{digest}.gguf", **arguments)
        return made[key]

    return make
