"""The library layer: which libllama is bound, import order, plain generation through
``rkv_local.Llama`` (tiny models of each arch and SmolLM2-135M), and load errors.

Tiny models run on one thread: they need no more, and spinning thread barriers make two threads
very slow when the two cores are busy with other work.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

import rkv_local
from rkv_local import Llama, _library
import llama_cpp

ROOT = Path(__file__).resolve().parents[1]
UNPATCHED_LIB_DIR = ROOT / "build-unpatched" / "install" / "rkv_local" / "lib"
RKV_SYMBOLS = (
    "rkv_params_default", "rkv_enable", "rkv_disable", "rkv_is_enabled", "rkv_last_error",
    "rkv_compress", "rkv_kv_bytes_per_cell", "rkv_get_stats", "rkv_get_kept_positions",
    "rkv_get_layer_inputs",
)
SUBPROCESS_TIMEOUT_S = 60
PROMPT = "Once upon a time"
ARCHS = {  # arch -> GQA shape (n_head, n_head_kv)
    "llama": dict(n_head=4, n_head_kv=2),
    "qwen2": dict(n_head=8, n_head_kv=2),
    "qwen3": dict(n_head=4, n_head_kv=1),
}


def clean_env(**extra: Optional[str]) -> Dict[str, str]:
    """This process's environment without the library overrides; ``extra`` sets (None: removes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "RKV_LOCAL_LIB_DIR")}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def run_python(code: str, **env: Optional[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
        cwd=ROOT, env=clean_env(**env),
    )


def greedy_tokens(llm: Llama, prompt: str, n: int) -> List[int]:
    """Exactly ``n`` greedy tokens (EOS included if drawn: it does not stop the loop)."""
    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    out: List[int] = []
    for tok in llm.generate(tokens, temp=0.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------
# which library is bound
# ---------------------------------------------------------------------------

def test_the_bound_library_is_ours_and_exports_the_engine() -> None:
    lib = llama_cpp.llama_cpp._lib
    loaded = Path(lib._name).resolve()
    assert loaded == _library.library_path().resolve()
    if "RKV_LOCAL_LIB_DIR" not in os.environ:
        assert loaded == (Path(rkv_local.__file__).resolve().parent / "lib" / _library.LIB_NAME).resolve()
    assert _library.loaded_library() is lib
    assert rkv_local.llama_cpp is llama_cpp
    missing = [name for name in RKV_SYMBOLS if not hasattr(lib, name)]
    assert not missing, f"{loaded} lacks {missing}"


def test_the_runtime_never_imports_the_evaluation_tools() -> None:
    runtime = ["rkv_local", "rkv_local.llama", "rkv_local.models", "rkv_local.reference", "rkv_local.server",
               "rkv_local.testing", "rkv_local.inspect_view", "rkv_local.demo"]
    result = run_python(f"import importlib, sys\nfor m in {runtime!r}: importlib.import_module(m)\n"
                        "print([m for m in sys.modules if m.startswith('rkv_local.evals')])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ggml_amx_path_is_left_out_unless_the_build_asked_for_it() -> None:
    """ggml's AMX matmul segfaults on some AMX CPUs (llama.cpp #20824): off by default."""
    info = _library.build_info()
    cpu_lib = _library.library_path().parent / _library.LIB_NAME.replace("llama", "ggml-cpu")
    has_amx = bool(ctypes.CDLL(str(cpu_lib)).ggml_cpu_has_amx_int8())
    features = llama_cpp.llama_print_system_info().decode()
    assert ("AMX_INT8 = 1" in features) == has_amx, features
    if not info["rkv_ggml_amx"]:
        assert not has_amx, f"{cpu_lib} was compiled with ggml's AMX path although RKV_GGML_AMX is off"


def test_llama_cpp_bound_elsewhere_first_is_refused_with_a_clear_message() -> None:
    if not (UNPATCHED_LIB_DIR / _library.LIB_NAME).exists():
        pytest.skip(f"no unpatched library in {UNPATCHED_LIB_DIR} (scripts/compare_unpatched.py builds it)")
    result = run_python("import llama_cpp; import rkv_local", LLAMA_CPP_LIB_PATH=str(UNPATCHED_LIB_DIR))
    assert result.returncode == 1, result.stderr
    assert "ImportError" in result.stderr
    assert "imported before rkv_local" in result.stderr
    assert "Import rkv_local first" in result.stderr
    assert str((UNPATCHED_LIB_DIR / _library.LIB_NAME).resolve()) in result.stderr


def test_llama_cpp_bound_to_our_library_first_is_accepted() -> None:
    lib_dir = _library.library_path().parent
    result = run_python(
        "import llama_cpp; import rkv_local; print(llama_cpp.llama_cpp._lib._name)",
        LLAMA_CPP_LIB_PATH=str(lib_dir),
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == _library.library_path().resolve()


def test_ggml_vulkans_graph_reordering_is_off_unless_asked_for() -> None:
    """Reordering corrupted memory with compressions on lavapipe (README, "Vulkan")."""
    code = f"import os, rkv_local; print(os.environ.get({_library.VULKAN_NO_GRAPH_OPTIMIZE!r}))"
    env = {_library.VULKAN_NO_GRAPH_OPTIMIZE: None, _library.VULKAN_GRAPH_OPTIMIZE_OPT_IN: None}
    assert run_python(code, **env).stdout.strip() == "1"
    assert run_python(code, **{**env, _library.VULKAN_GRAPH_OPTIMIZE_OPT_IN: "1"}).stdout.strip() == "None"


# ---------------------------------------------------------------------------
# tiny models of each arch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [None, 32])
def test_a_path_object_is_a_model_path(tiny_model, budget) -> None:
    path = tiny_model(arch="llama", **ARCHS["llama"])
    assert isinstance(path, Path)
    llm = Llama(path, n_ctx=256, n_threads=1, verbose=False, kv_budget=budget, kv_buffer=16)
    try:
        assert llm.model_path == str(path)
        assert llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_model_greedy_without_budget_is_deterministic(tiny_model, arch: str) -> None:
    path = str(tiny_model(arch=arch, **ARCHS[arch]))
    runs = []
    for _ in range(2):
        llm = Llama(path, n_ctx=256, n_threads=1, seed=7, verbose=False)
        try:
            assert llm.kv_config is None
            tokens = greedy_tokens(llm, PROMPT, 40)
            eos = llm.token_eos()
            out = llm.create_completion(PROMPT, max_tokens=24, temperature=0.0, logit_bias={eos: -1e9})
            stats = llm.kv_stats()
        finally:
            llm.close()
        assert len(tokens) == 40
        assert out["usage"]["completion_tokens"] == 24
        assert out["choices"][0]["finish_reason"] == "length"
        assert stats.method == "full" and stats.compressions == 0
        runs.append((tokens, out["choices"][0]["text"]))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_model_with_budget_generates_far_beyond_it(tiny_model, arch: str) -> None:
    budget, buffer, n = 32, 16, 150
    path = str(tiny_model(arch=arch, **ARCHS[arch]))
    llm = Llama(path, kv_budget=budget, kv_buffer=buffer, n_threads=1, seed=7, verbose=False)
    try:
        tokens = greedy_tokens(llm, PROMPT, n)
        stats = llm.kv_stats()
        n_prompt = len(llm.tokenize(PROMPT.encode(), add_bos=True))
    finally:
        llm.close()
    assert len(tokens) == n
    assert stats.compressions > 0
    assert stats.evicted_tokens > 0
    assert stats.cells_used <= budget + buffer
    assert stats.cells_peak <= budget + buffer
    # the last sampled token is never evaluated
    assert stats.n_tokens == n_prompt + n - 1
    assert stats.kv_bytes_used < stats.kv_bytes_full


# ---------------------------------------------------------------------------
# SmolLM2-135M chat
# ---------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
]


def chat(llm: Llama, max_tokens: int = 32) -> dict:
    return llm.create_chat_completion(messages=MESSAGES, max_tokens=max_tokens, temperature=0.0, seed=3)


@pytest.fixture(scope="module")
def smol_chat(smollm2_path: Path) -> dict:
    llm = Llama(str(smollm2_path), n_ctx=512, n_threads=2, seed=3, verbose=False)
    try:
        return chat(llm)
    finally:
        llm.close()


def test_smollm2_chat_completion(smol_chat: dict) -> None:
    choice = smol_chat["choices"][0]
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert content and content.strip()
    usage = smol_chat["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 32
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert choice["finish_reason"] in ("stop", "length")
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 32


def test_smollm2_chat_is_reproducible_and_equals_llama_cpp(smollm2_path: Path, smol_chat: dict) -> None:
    expected = smol_chat["choices"][0]["message"]["content"]
    again = Llama(str(smollm2_path), n_ctx=512, n_threads=2, seed=3, verbose=False)
    try:
        assert chat(again)["choices"][0]["message"]["content"] == expected
    finally:
        again.close()
    stock = llama_cpp.Llama(str(smollm2_path), n_ctx=512, n_threads=2, seed=3, verbose=False)
    try:
        assert chat(stock)["choices"][0]["message"]["content"] == expected
    finally:
        stock.close()


def test_smollm2_chat_with_an_untriggered_budget_is_unchanged(smollm2_path: Path, smol_chat: dict) -> None:
    # the prompt and 32 tokens stay well below budget + buffer: the engine is on but never compresses
    llm = Llama(str(smollm2_path), kv_budget=256, kv_buffer=128, n_threads=2, seed=3, verbose=False)
    try:
        out = chat(llm)
        stats = llm.kv_stats()
    finally:
        llm.close()
    assert stats.compressions == 0
    assert out["choices"][0]["message"]["content"] == smol_chat["choices"][0]["message"]["content"]
    assert out["usage"] == smol_chat["usage"]


# ---------------------------------------------------------------------------
# load errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [None, 32])
def test_missing_model_file_raises_value_error_naming_it(tmp_path: Path, budget) -> None:
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(ValueError, match="Model path does not exist") as info:
        Llama(str(missing), kv_budget=budget, verbose=False)
    assert str(missing) in str(info.value)


def _corrupt_files(tiny_model, folder: Path) -> Dict[str, Path]:
    source = tiny_model(arch="llama", **ARCHS["llama"]).read_bytes()
    files = {
        "random-bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty": b"",
        "truncated-header": source[:64],
        "truncated-metadata": source[: len(source) // 50],
        "truncated-tensors": source[: len(source) // 2],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.gguf"
        paths[name].write_bytes(data)
    return paths


def test_corrupt_gguf_raises_a_python_exception_not_a_crash(tiny_model, tmp_path: Path) -> None:
    paths = _corrupt_files(tiny_model, tmp_path)
    # one subprocess for all cases: a crash (signal) would show as a negative return code
    code = (
        "import sys, rkv_local\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        rkv_local.Llama(path, n_ctx=64, verbose=False)\n"
        "    except ValueError as exc:\n"
        "        print('ERR', path, '|', exc, flush=True)\n"
        "    else:\n"
        "        print('LOADED', path, flush=True)\n"
        "raise SystemExit('all done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths.values())], capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, cwd=ROOT, env=clean_env(),
    )
    assert result.returncode == 1 and "all done" in result.stderr, (
        f"return code {result.returncode} (negative: killed by a signal)\n{result.stdout}\n{result.stderr[-2000:]}"
    )
    lines = result.stdout.splitlines()
    for name, path in paths.items():
        line = next((ln for ln in lines if f" {path} " in ln or ln.endswith(f" {path}")), None)
        assert line is not None, f"{name}: no outcome\n{result.stdout}"
        assert line.startswith("ERR"), f"{name} loaded: {line}"
        assert "Failed to load model" in line and str(path) in line.split("|", 1)[1]


def test_a_lone_corrupt_gguf_exits_with_a_python_traceback(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    result = run_python(f"import rkv_local; rkv_local.Llama({str(path)!r}, verbose=False)")
    assert result.returncode == 1, f"return code {result.returncode}\n{result.stderr[-2000:]}"
    assert "Traceback" in result.stderr
    assert f"ValueError: Failed to load model from file: {path}" in result.stderr
