"""llama-cpp-python's own test suite, run against ``rkv_local.Llama``.

The test files come unchanged from the llama-cpp-python sdist the build downloads (they are
extracted here, next to this file, and git-ignored). Every test runs three ways: ``llama_cpp.Llama``
replaced by ``rkv_local.Llama`` without a budget, with a budget larger than any test's context, and
with a small budget that compresses during the tests (checked at the end of the session).

What the suite downloads is mapped to the models we fetch; models of kinds we do not target skip,
and so do the few assertions tied to one model's token ids (listed in ``SKIPPED``).
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest

from rkv_local import Llama, _library, llama_cpp
from rkv_local.models import default_cache_dir, fetch

SDIST_VERSION = "0.3.36"
SUITE = ("test_llama.py", "test_llama_chat_format.py", "test_llama_grammar.py", "test_llama_speculative.py")
HERE = Path(__file__).parent

# (repo_id, filename) the suite downloads -> ours, or why the tests that need it skip
MODELS: dict[tuple[str, str], str] = {
    ("lmstudio-community/Qwen3.5-0.8B-GGUF", "Qwen3.5-0.8B-Q8_0.gguf"): "qwen2.5-coder-0.5b",
    ("ggml-org/models", "tinyllamas/stories15M-q4_0.gguf"): "smollm2-135m",
}
UNTARGETED = {
    "CompendiumLabs/bge-small-en-v1.5-gguf": "an embedding model (no generation, no KV cache to compress)",
    "QuantFactory/mamba-130m-hf-GGUF": "a recurrent model (no attention KV cache)",
    "tiiuae/Falcon-H1-Tiny-90M-Instruct-GGUF": "a hybrid recurrent model (not a target of rkv-local)",
}
# tests whose assertions hold for one model's token ids only: they would test the model, not us
SKIPPED = {
    "test_real_model": "asserts Qwen3.5's token ids for 'Hello, world!' (llama.cpp's low-level API, no Llama)",
}

# mode -> arguments added to every Llama the suite creates. The small budget compresses its prompts of
# 13+ tokens (Qwen); 6 + 2 already changes what the model answers there (it says 'false').
MODES: dict[str, dict[str, Any]] = {
    "no-budget": {},
    "large-budget": {"kv_budget": 1024, "kv_buffer": 128},
    "small-budget": {"kv_budget": 8, "kv_buffer": 4, "kv_window": 4},
}


def _extract_suite() -> None:
    """Copy the sdist's tests here once (a new sdist version or a missing file extracts again)."""
    if all((HERE / name).exists() for name in SUITE):
        return
    sdist = default_cache_dir() / "sdist" / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.exists():
        raise pytest.UsageError(f"{sdist} is missing: `make build` downloads it (llama-cpp-python's test suite)")
    with tarfile.open(sdist) as archive:
        for name in SUITE:
            member = archive.extractfile(f"llama_cpp_python-{SDIST_VERSION}/tests/{name}")
            (HERE / name).write_bytes(member.read())


_extract_suite()

_compressions: dict[str, int] = {name: 0 for name in MODES}
_instances: list[Llama] = []


def _make_budgeted(mode: str) -> type[Llama]:
    extra = MODES[mode]

    class SuiteLlama(Llama):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            for key, value in extra.items():
                kwargs.setdefault(key, value)
            super().__init__(*args, **kwargs)
            _instances.append(self)

    SuiteLlama.__name__ = SuiteLlama.__qualname__ = "Llama"
    return SuiteLlama


def _local_model(repo_id: str, filename: str, **_: Any) -> str:
    if (repo_id, filename) in MODELS:
        return str(fetch(MODELS[repo_id, filename]))
    pytest.skip(f"{repo_id}/{filename} is {UNTARGETED.get(repo_id, 'a model we do not fetch')}")


@pytest.fixture(autouse=True, params=list(MODES))
def rkv_llama(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``llama_cpp.Llama`` is ours for the test; the suite's downloads resolve to our models."""
    reason = SKIPPED.get(request.node.originalname)
    if reason:
        pytest.skip(reason)
    monkeypatch.setattr(llama_cpp, "Llama", _make_budgeted(request.param))
    monkeypatch.setattr(request.module, "hf_hub_download", _local_model, raising=False)
    # the suite opens ./vendor/llama.cpp/models/ggml-vocab-*.gguf of the source checkout
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "llama.cpp").symlink_to(_library.build_info()["llama_source"])
    monkeypatch.chdir(tmp_path)
    yield request.param
    budget = MODES[request.param].get("kv_budget")
    for llm in _instances:
        stats = llm.kv_stats()
        _compressions[request.param] += stats.compressions
        if budget is not None:
            assert stats.cells_peak <= budget + MODES[request.param]["kv_buffer"], stats
    _instances.clear()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    small_runs = [item for item in session.items if "small-budget" in item.nodeid and "test_llama.py" in item.nodeid]
    if exitstatus == 0 and small_runs and _compressions["small-budget"] == 0:
        session.config.get_terminal_writer().line(
            "llama-cpp-python's suite with the small budget never compressed: it tested nothing of ours", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    counts = ", ".join(f"{mode}: {n}" for mode, n in _compressions.items())
    terminalreporter.write_line(f"llama-cpp-python's suite, compressions by mode: {counts}")
