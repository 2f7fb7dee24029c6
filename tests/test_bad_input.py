"""Bad input gets a clear Python exception naming the problem; the process lives on and the
instance stays usable, or is cleanly closed (issue 14, item 4).

The matrix, and where each row is tested:

| input | here / elsewhere |
|---|---|
| model file missing, truncated, corrupt (garbage, a bad header, cut tensor data) | here |
| a GGUF of an unsupported architecture | test_refusals.py, test_llama_api.py |
| a state truncated, garbage, corrupt in its compression part, from another model | here |
| a state from another budget, buffer or window | test_llama_api.py (`a_state_from_other_settings`) |
| a state from another method; a budgeted state into a Llama without a budget | here |
| kv_budget ≤ window, 0, negative, beyond the model's context; kv_buffer 0; kv_lambda NaN or outside [0, 1]; kv_window 0; n_batch 0 | test_llama_api.py (`bad_settings_are_refused`), here for 0 and negative |
| a prompt past the logical context | here |
| a closed instance used again | test_llama_api.py (`a_closed_instance_raises`) |
| a grammar llama.cpp cannot parse; a logit_bias key that is no token id (Llama, BatchedLlama) | here; the server: test_server.py |
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

import llama_cpp

from rkv_local import BatchedLlama, Llama

from engine_helpers import random_tokens

THREADS = dict(n_threads=1, n_threads_batch=1, verbose=False)
B, b = 32, 16


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Path:
    return tiny_model(arch="llama")


def budgeted(path, **kwargs) -> Llama:
    settings = dict(kv_budget=B, kv_buffer=b)
    settings.update(kwargs)
    return Llama(str(path), **THREADS, **settings)


def assert_usable(llm: Llama) -> None:
    """The instance still works: it evaluates, compresses and answers."""
    llm.reset()
    llm.eval(random_tokens(3 * (B + b), seed=99))
    assert llm.kv_stats().compressions > 0 if llm.kv_config else llm.n_tokens == 3 * (B + b)
    assert llm.create_completion("Hello", max_tokens=3, temperature=0.0)["usage"]["completion_tokens"] <= 3


# ---------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------

def broken_copies(tiny: Path, folder: Path) -> dict[str, Path]:
    data = tiny.read_bytes()
    files = {
        "truncated header": data[:200],
        "truncated tensor data": data[: len(data) * 3 // 4],
        "garbage": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "garbage after the magic": b"GGUF" + bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)),
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        path = folder / (name.replace(" ", "-") + ".gguf")
        path.write_bytes(content)
        out[name] = path
    return out


@pytest.mark.parametrize("budget", [None, B, 1024])  # 1024: the training context is read first
def test_a_broken_model_file_is_a_value_error(tiny: Path, tmp_path: Path, budget) -> None:
    for name, path in broken_copies(tiny, tmp_path).items():
        with pytest.raises(ValueError, match="Failed to load model from file"):
            Llama(str(path), kv_budget=budget, **THREADS)
    # the process goes on: the intact file loads
    llm = Llama(str(tiny), kv_budget=budget, **THREADS)
    llm.close()


@pytest.mark.parametrize("budget", [None, B, 1024])
def test_a_missing_model_file_is_named(tmp_path: Path, budget) -> None:
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(ValueError, match=f"Model path does not exist: {missing}"):
        Llama(missing, kv_budget=budget, **THREADS)


# ---------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, -5])
def test_a_budget_of_zero_or_below_is_refused(tiny: Path, budget: int) -> None:
    with pytest.raises(ValueError, match=rf"kv_budget \({budget}\) must exceed kv_window \(8\)"):
        budgeted(tiny, kv_budget=budget)


def test_a_prompt_past_the_logical_context_is_refused_and_the_instance_goes_on(tiny: Path) -> None:
    llm = budgeted(tiny, n_ctx=300)
    try:
        llm.eval(random_tokens(100, seed=3))
        with pytest.raises(ValueError, match=r"Requested tokens \(400\) exceed the context window of 300 tokens"):
            llm.create_completion(random_tokens(400, seed=4), max_tokens=4)
        with pytest.raises(ValueError, match=r"evaluating 250 tokens after 100 would exceed the logical context"):
            llm.eval(random_tokens(250, seed=5))
        assert llm.n_tokens == 100 and llm.kv_stats().n_tokens == 100
        assert_usable(llm)
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# states
# ---------------------------------------------------------------------------

def compressed_state(path: Path, **kwargs):
    llm = budgeted(path, **kwargs)
    try:
        llm.eval(random_tokens(150, seed=7))
        assert llm.kv_stats().compressions > 0
        return llm.save_state()
    finally:
        llm.close()


def with_bytes(state, data: bytes):
    """A copy of a LlamaState carrying other llama.cpp state bytes."""
    other = copy.copy(state)
    other.llama_state, other.llama_state_size = data, len(data)
    return other


def engine_part(data: bytes) -> int:
    """Offset of the compression engine's part of a state ("RKV4", its settings, each layer's
    attention scale, then its streams)."""
    at = data.rfind(b"RKV4")
    assert at > 0
    return at


def corrupted(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset:offset + 4] = int(value).to_bytes(4, "little", signed=True)
    return bytes(out)


def test_broken_states_are_refused_and_leave_an_empty_usable_instance(tiny: Path) -> None:
    state = compressed_state(tiny)
    data = state.llama_state
    rkv = engine_part(data)
    # the engine part: magic, budget/buffer/window, one attention scale per layer (2 layers), then
    # pos_compact, pos_scored, n_compact, n_keep, pos_keep, paused (1 byte), three counters, the slot count
    stream = rkv + 16 + 4 * 2
    broken = {
        "truncated": data[: len(data) // 2],
        "truncated in the engine part": data[: rkv + 30],
        "one byte short": data[:-1],
        "garbage": bytes(np.random.default_rng(2).integers(0, 256, len(data), dtype=np.uint8)),
        "empty": b"",
        "an attention scale that is no scale": corrupted(data, rkv + 16, -1),
        "the older format": data[:rkv] + b"RKV2" + data[rkv + 4:],
        "the previous format": data[:rkv] + b"RKV3" + data[rkv + 4:],
        "kept cells beyond the cache": corrupted(data, stream + 12, 10**6),
        "a pause flag that is no flag": data[:stream + 20] + b"\x07" + data[stream + 21:],
        "n_compact out of range": corrupted(data, stream + 8, 10**6),
        "pos_compact beyond the tokens": corrupted(corrupted(data, stream, 10**6), stream + 4, 10**6),
        "slot count that does not match": corrupted(data, stream + 21 + 24, 3),
    }
    llm = budgeted(tiny)
    try:
        for name, content in broken.items():
            llm.eval(random_tokens(60, seed=8))
            with pytest.raises(RuntimeError, match="failed to restore the state") as refused:
                llm.load_state(with_bytes(state, content))
            assert refused.value.__cause__ is not None, name
            s = llm.kv_stats()
            assert (llm.n_tokens, s.cells_used, s.compressions, s.n_tokens) == (0, 0, 0, 0), name
            assert_usable(llm)
        llm.load_state(state)  # the intact state still loads
        assert llm.kv_stats().compressions > 0
    finally:
        llm.close()


def test_a_state_of_another_model_is_refused(tiny: Path, tiny_model) -> None:
    other = tiny_model(arch="llama", n_head=4, n_head_kv=4, head_dim=32)  # same architecture, other shape
    state = compressed_state(other)
    llm = budgeted(tiny)
    try:
        with pytest.raises(RuntimeError, match="same model with the same kv_budget"):
            llm.load_state(state)
        assert llm.n_tokens == 0
        assert_usable(llm)
    finally:
        llm.close()


def test_a_state_of_another_method_is_refused_before_anything_changes(tiny: Path) -> None:
    state = compressed_state(tiny, kv_method="snapkv")
    llm = budgeted(tiny, kv_method="rkv")
    try:
        llm.eval(random_tokens(20, seed=9))
        with pytest.raises(ValueError, match="this state was saved with kv_method='snapkv'; this Llama has kv_method='rkv'"):
            llm.load_state(state)
        assert llm.n_tokens == llm.kv_stats().n_tokens == 20
    finally:
        llm.close()


def test_a_budgeted_state_into_a_llama_without_budget_is_refused(tiny: Path) -> None:
    state = compressed_state(tiny)
    stock = Llama(str(tiny), n_ctx=256, **THREADS)
    try:
        stock.eval(random_tokens(20, seed=10))
        with pytest.raises(ValueError, match=f"this state was saved with kv_budget={B}; this Llama has no kv_budget"):
            stock.load_state(state)
        assert stock.n_tokens == 20
        assert_usable(stock)
    finally:
        stock.close()


def test_a_state_file_that_was_cut_short_is_refused(tiny: Path, tmp_path: Path) -> None:
    """A state written to disk (pickled, as llama-cpp-python's disk cache does) and cut short."""
    import pickle

    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps(compressed_state(tiny)))
    cut = tmp_path / "cut.pkl"
    shutil.copyfile(path, cut)
    with open(cut, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises((pickle.UnpicklingError, EOFError)):
        pickle.loads(cut.read_bytes())
    llm = budgeted(tiny)
    try:
        llm.load_state(pickle.loads(path.read_bytes()))
        assert llm.kv_stats().compressions > 0
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# sampling settings: llama-cpp-python crashed on a grammar llama.cpp cannot parse (a NULL sampler
# in the chain) and dropped every bias of a request with a key that is no token id
# ---------------------------------------------------------------------------

BAD_GRAMMARS = ["root ::= (", "root ::= undefined", 'start ::= "a"']
BAD_BIASES = [{999_999_999: 5.0}, {-3: 5.0}, {"abc": 5.0}]


def sampling_refusals(llm) -> list:
    """(call, expected words) for each bad setting, through each entry point of ``llm``: each raises
    when called, a stream too (before its first chunk)."""
    calls = []
    for text in BAD_GRAMMARS:
        grammar = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
        calls += [
            (lambda g=grammar: llm.create_completion("Hi", max_tokens=3, grammar=g), "grammar"),
            (lambda g=grammar: llm.create_completion("Hi", max_tokens=3, grammar=g, stream=True), "grammar"),
            (lambda g=grammar: llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3,
                                                          grammar=g), "grammar"),
        ]
    for bias in BAD_BIASES:
        calls += [
            (lambda b=bias: llm.create_completion("Hi", max_tokens=3, logit_bias=b), "not a token id"),
            (lambda b=bias: llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3,
                                                       logit_bias=b), "not a token id"),
        ]
    return calls


def assert_sampling_settings_work(llm) -> None:
    yes_no = llama_cpp.LlamaGrammar.from_string('root ::= " yes" | " no"', verbose=False)
    out = llm.create_completion("Hi", max_tokens=4, temperature=0.0, grammar=yes_no)
    assert out["choices"][0]["text"] in (" yes", " no")
    forced = llm.create_completion("Hi", max_tokens=2, temperature=0.0, logit_bias={45: 100.0})  # 45: "="
    assert forced["choices"][0]["text"] == "=="


@pytest.mark.parametrize("budget", [None, B])
def test_bad_grammar_and_logit_bias_are_value_errors_in_llama(tiny: Path, budget) -> None:
    llm = Llama(str(tiny), n_ctx=256, **THREADS, **({"kv_budget": B, "kv_buffer": b} if budget else {}))
    for call, words in sampling_refusals(llm):
        with pytest.raises(ValueError, match=words):
            call()
    bad = llama_cpp.LlamaGrammar.from_string("root ::= (", verbose=False)
    with pytest.raises(ValueError, match="grammar"):
        next(llm.generate(llm.tokenize(b"Hi"), grammar=bad))
    assert_sampling_settings_work(llm)
    llm.close()


def test_bad_grammar_and_logit_bias_are_value_errors_in_batched_llama(tiny: Path) -> None:
    with BatchedLlama(str(tiny), n_seq_max=2, kv_budget=B, kv_buffer=b, **THREADS) as llm:
        for call, words in sampling_refusals(llm):
            with pytest.raises(ValueError, match=words):
                call()
        assert_sampling_settings_work(llm)
