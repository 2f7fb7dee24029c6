"""The budgeted ``Llama``: every generation path far beyond the physical cache, prefix reuse across
turns, state, statistics and refusals (issue 4, items 1-6).

Tiny random-weight models where only tokens matter (one thread: the suite shares two cores);
SmolLM2-135M where a chat template and real text matter.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from rkv_local import BatchedLlama, KVStats, Llama, _native
import llama_cpp

from engine_helpers import greedy, last_logits, random_tokens
from near_tie import GapRecorder, assert_same_completion, assert_same_greedy, recorded

THREADS = dict(n_threads=1, n_threads_batch=1, verbose=False)
B, b = 32, 16  # physical cache: PAD(48, 256) = 256 cells, at most 48 of them per sequence
PHYSICAL = 256


@pytest.fixture(scope="module")
def tiny(tiny_model) -> str:
    return str(tiny_model(arch="llama"))


def budgeted(path: str, budget: int = B, buffer: int = b, **kwargs) -> Llama:
    return Llama(path, kv_budget=budget, kv_buffer=buffer, **THREADS, **kwargs)


@pytest.fixture(scope="module")
def eog_ids(tiny: str) -> list[int]:
    llm = Llama(tiny, n_ctx=64, **THREADS)
    try:
        vocab = llm._model.vocab
        return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    finally:
        llm.close()


def no_eog(eog: list[int]) -> llama_cpp.LogitsProcessorList:
    """Random weights may pick an end-of-generation token: ban them so lengths are exact."""

    def ban(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores[eog] = -np.inf
        return scores

    return llama_cpp.LogitsProcessorList([ban])


def force_at(step: int, token: int, eog: list[int]) -> llama_cpp.LogitsProcessorList:
    """Ban end-of-generation tokens, and make the token sampled at ``step`` (0-based) ``token``."""
    calls = [0]

    def force(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if calls[0] == step:
            scores[:] = -np.inf
            scores[token] = 0.0
        else:
            scores[eog] = -np.inf
        calls[0] += 1
        return scores

    return llama_cpp.LogitsProcessorList([force])


def take(llm: Llama, prompt: list[int], n: int, gaps: Optional[list[float]] = None) -> list[int]:
    """The first n tokens ``generate`` samples greedily (it never stops by itself); ``gaps``, if given,
    receives the gap between the two best logits of each (for ``near_tie.assert_same_greedy``)."""
    recorder = GapRecorder()
    out = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([recorder])):
        out.append(int(tok))
        if len(out) == n:
            break
    if gaps is not None:
        gaps.extend(recorder.gaps[:n])
    return out


def prompt_of(n: int, seed: int, bos: int = 1) -> list[int]:
    return [bos] + random_tokens(n - 1, seed)


def check_bounded(stats: KVStats, budget: int = B, buffer: int = b) -> None:
    assert stats.compressions > 0 and stats.evicted_tokens > 0
    assert stats.cells_peak <= budget + buffer and stats.cells_used <= budget + buffer
    assert stats.cells_max == budget + buffer


# ---------------------------------------------------------------------------
# 1. constructor
# ---------------------------------------------------------------------------

def test_budget_gives_a_small_physical_cache_and_the_training_context_as_logical_one(tiny: str) -> None:
    llm = budgeted(tiny)
    try:
        assert llm.context_params.n_ctx == PHYSICAL
        assert llama_cpp.llama_n_ctx(llm.ctx) == PHYSICAL
        assert llm.n_ctx() == llm._n_ctx == llm._model.n_ctx_train() == 4096
        assert llm.n_batch == b and llm.context_params.n_batch == b and llm.context_params.n_ubatch == b
        assert llm.input_ids.shape == (4096,)
        assert llm.kv_config.budget == B and llm.kv_config.buffer == b and llm.kv_config.method == "rkv"
        s = llm.kv_stats()
        assert (s.method, s.budget, s.buffer, s.compressions, s.cells_used, s.n_tokens) == ("rkv", B, b, 0, 0, 0)
        assert (s.n_ctx, s.cells_max, s.pos_compacted, s.tokens_evaluated) == (4096, B + b, -1, 0)
    finally:
        llm.close()
    llm = budgeted(tiny, budget=200, buffer=100, n_ctx=1000, n_batch=64, kv_method="snapkv", kv_window=4,
                   kv_lambda=0.2)
    try:
        assert llm.context_params.n_ctx == 512 and llm.n_ctx() == 1000 and llm.input_ids.shape == (1000,)
        assert llm.n_batch == 64 and llm.context_params.n_ubatch == 64
        cfg = llm.kv_config
        assert (cfg.method, cfg.window, cfg.lam) == ("snapkv", 4, pytest.approx(0.2))
    finally:
        llm.close()


def test_without_a_budget_it_is_llama_cpp_python(tiny: str) -> None:
    prompt = prompt_of(40, seed=3)
    ours, stock = Llama(tiny, n_ctx=256, **THREADS), llama_cpp.Llama(tiny, n_ctx=256, **THREADS)
    try:
        assert ours.kv_config is None
        for attr in ("n_batch", "_n_ctx", "_logits_all"):
            assert getattr(ours, attr) == getattr(stock, attr)
        assert ours.n_ctx() == stock.n_ctx() == 256
        assert ours.input_ids.shape == stock.input_ids.shape and ours.scores.shape == stock.scores.shape
        assert take(ours, prompt, 30) == take(stock, prompt, 30)
        s = ours.kv_stats()
        assert s.method == "full" and s.budget is None and s.compressions == 0
        assert s.cells_used == s.n_tokens == 40 + 29 and s.kv_bytes_used == s.kv_bytes_full
        # its figures past a full cache are llama-cpp-python's too: no logical context
        with pytest.raises(ValueError, match="exceed context window of 256"):
            ours.create_completion(prompt_of(300, seed=1), max_tokens=1)
    finally:
        ours.close()
        stock.close()


# ---------------------------------------------------------------------------
# 2. generation far beyond the physical cache
# ---------------------------------------------------------------------------

def test_a_prompt_longer_than_the_cache_is_evaluated_in_chunks(tiny: str, eog_ids) -> None:
    prompt = prompt_of(600, seed=11)
    llm = budgeted(tiny, budget=64, buffer=32)
    try:
        out = llm.create_completion(prompt, max_tokens=50, temperature=0.0, logits_processor=no_eog(eog_ids))
        s = llm.kv_stats()
        completion = llm.input_ids[600:llm.n_tokens].tolist()
    finally:
        llm.close()
    assert out["usage"] == {"prompt_tokens": 600, "completion_tokens": 50, "total_tokens": 650}
    assert out["choices"][0]["finish_reason"] == "length"
    check_bounded(s, 64, 32)
    assert s.prompt_tokens == s.prompt_tokens_evaluated == 600
    assert s.n_tokens == s.tokens_evaluated == 649
    # the same tokens as driving the engine one decode call at a time
    ref = budgeted(tiny, budget=64, buffer=32)
    try:
        ref.eval(prompt)
        for expected in completion:
            logits = last_logits(ref)
            logits[eog_ids] = -np.inf
            assert int(np.argmax(logits)) == expected
            ref.eval([expected])
        assert ref.kv_stats().compressions == s.compressions
    finally:
        ref.close()


def test_completion_paths_agree_far_beyond_the_physical_cache(tiny: str, eog_ids) -> None:
    prompt = "Once upon a time"
    n = 300  # positions run past the 256 physical cells
    llm = budgeted(tiny)
    try:
        n_prompt = len(llm.tokenize(prompt.encode()))
        kw = dict(max_tokens=n, temperature=0.0, logits_processor=no_eog(eog_ids))
        plain = llm.create_completion(prompt, **kw)
        s = llm.kv_stats()
        called = llm(prompt, **kw)
        chunks = list(llm.create_completion(prompt, stream=True, **kw))
    finally:
        llm.close()
    text = plain["choices"][0]["text"]
    assert plain["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == n and n_prompt + n > PHYSICAL
    check_bounded(s)
    assert s.n_tokens == n_prompt + n - 1
    # the same prompt again cannot reuse the compressed cache: evaluated afresh, same answer
    assert called["choices"][0]["text"] == text and called["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_chat_completion_streams_far_beyond_the_physical_cache(tiny: str, eog_ids) -> None:
    messages = [{"role": "user", "content": "Tell me a long story."}]
    n = 280
    llm = budgeted(tiny)
    try:
        kw = dict(messages=messages, max_tokens=n, temperature=0.0, logits_processor=no_eog(eog_ids))
        plain = llm.create_chat_completion(**kw)
        s = llm.kv_stats()
        chunks = list(llm.create_chat_completion(stream=True, **kw))
    finally:
        llm.close()
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "length" and plain["usage"]["completion_tokens"] == n
    assert plain["usage"]["prompt_tokens"] + n > PHYSICAL
    check_bounded(s)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_finish_reason_length_at_the_logical_context(tiny: str, eog_ids) -> None:
    prompt = prompt_of(20, seed=5)
    llm = budgeted(tiny, n_ctx=300)
    try:
        for max_tokens in (None, 0, 1000):
            out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0,
                                        logits_processor=no_eog(eog_ids))
            assert out["choices"][0]["finish_reason"] == "length"
            assert out["usage"]["completion_tokens"] == 280
            assert llm.n_tokens == 299
        check_bounded(llm.kv_stats())
        out = llm.create_completion(prompt, max_tokens=100, temperature=0.0, logits_processor=no_eog(eog_ids))
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 100
        with pytest.raises(ValueError, match=r"Requested tokens \(300\) exceed the context window of 300 tokens"):
            llm.create_completion(prompt_of(300, seed=6), max_tokens=1)
        # positions past the logical context are refused however they are reached
        llm.reset()
        llm.eval(prompt_of(290, seed=7))
        with pytest.raises(ValueError, match="logical context"):
            llm.eval(random_tokens(11, seed=8))
    finally:
        llm.close()


@pytest.mark.parametrize("stream", [False, True])
def test_finish_reason_stop_far_beyond_the_cache(tiny: str, eog_ids, stream: bool) -> None:
    prompt = prompt_of(230, seed=9)
    step = 40  # the stop comes at position 270: past the 256 physical cells
    llm = budgeted(tiny)
    banana = llm.tokenize(b" banana", add_bos=False)
    assert len(banana) == 1

    def complete(**kw) -> tuple[str, str, Optional[int]]:
        out = llm.create_completion(prompt, max_tokens=1000, temperature=0.0, stream=stream, **kw)
        if not stream:
            return out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]
        chunks = list(out)
        return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"], None

    try:
        text_eos, reason, n = complete(logits_processor=force_at(step, eog_ids[0], eog_ids))
        assert reason == "stop" and n in (None, step)
        assert llm.kv_stats().compressions > 0 and llm.n_tokens == 230 + step
        text_stop, reason, n = complete(logits_processor=force_at(step, banana[0], eog_ids), stop=["banana"])
        assert reason == "stop" and "banana" not in text_stop
        assert text_stop.rstrip() == text_eos.rstrip()
        # a stopping criterion ends it too
        criteria = llama_cpp.StoppingCriteriaList([lambda ids, _logits: len(ids) >= 230 + step])
        text_crit, reason, n = complete(logits_processor=no_eog(eog_ids), stopping_criteria=criteria)
        assert reason == "stop" and n in (None, step)
        assert text_crit == text_eos
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# 3. prefix reuse
# ---------------------------------------------------------------------------

def test_prefix_reuse_of_a_compressed_cache(tiny: str) -> None:
    first = prompt_of(200, seed=21)
    llm = budgeted(tiny)
    try:
        out = take(llm, first, 40)
        held = llm.input_ids[:llm.n_tokens].tolist()
        assert held == first + out[:-1]
        s = llm.kv_stats()
        assert s.compressions > 0 and s.prompt_tokens_evaluated == 200

        # extending what the cache holds: only the new tokens are evaluated
        extended = first + out + random_tokens(30, seed=22)
        more = take(llm, extended, 20)
        s2 = llm.kv_stats()
        assert s2.prompt_tokens == len(extended)
        assert s2.prompt_tokens_evaluated == len(extended) - len(held) == 31
        assert s2.compressions > s.compressions  # the same sequence went on

        # departing from it just after the last compression: the common part is reused too
        n_keep = llm.n_tokens - 1
        branch = llm.input_ids[:n_keep].tolist() + random_tokens(10, seed=23)
        take(llm, branch, 5)
        assert llm.kv_stats().prompt_tokens_evaluated == 10

        # departing inside the compressed part: evaluated from scratch, like a fresh instance
        diverged = first[:100] + random_tokens(150, seed=24)
        got = take(llm, diverged, 40)
        s3 = llm.kv_stats()
        assert s3.prompt_tokens_evaluated == len(diverged)
    finally:
        llm.close()
    fresh = budgeted(tiny)
    try:
        assert take(fresh, diverged, 40) == got
        f = fresh.kv_stats()
        assert (f.compressions, f.evicted_tokens, f.cells_used, f.pos_compacted, f.n_tokens) == \
            (s3.compressions, s3.evicted_tokens, s3.cells_used, s3.pos_compacted, s3.n_tokens)
        # and the extension above is reproducible
        again = budgeted(tiny)
        try:
            take(again, first, 40)
            assert take(again, extended, 20) == more
        finally:
            again.close()
    finally:
        fresh.close()


@pytest.mark.parametrize("cls", [Llama, BatchedLlama])
def test_a_misspelled_kv_argument_is_refused_with_the_right_name(tiny: str, cls: type) -> None:
    """llama-cpp-python's Llama swallows unknown keyword arguments: kv_budgt=64 ran without a budget
    (issue 22)."""
    for wrong, right in (("kv_budgt", "kv_budget"), ("kv_metod", "kv_method"), ("kv_bufer", "kv_buffer"),
                         ("kv_windw", "kv_window"), ("kv_lamda", "kv_lambda")):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{wrong}'; did you mean {right}\\?"):
            cls(tiny, verbose=False, **{wrong: 64})
    with pytest.raises(TypeError, match="the kv_\\* arguments: kv_budget, kv_buffer"):
        cls(tiny, verbose=False, kv_zzz=1)
    llm = cls(tiny, kv_overrides={"general.name": "renamed"}, n_ctx=64, verbose=False)   # llama-cpp-python's own
    llm.close()


def test_n_batch_of_llama_cpp_python_code_works_with_a_budget(smollm2_path: Path) -> None:
    """llama-cpp-python code passes n_batch (its default is 512): with a budget a prompt is then
    evaluated in decode calls of at most kv_buffer tokens, and the text is the same (issue 22)."""
    prompt = " ".join(f"Item {i} is a {'red' if i % 3 else 'blue'} box." for i in range(60))
    texts, shapes, recorders = {}, {}, {}
    for n_batch in (None, 8, 128, 512):
        extra = {} if n_batch is None else dict(n_batch=n_batch, n_ubatch=n_batch)
        llm = Llama(str(smollm2_path), kv_budget=256, n_threads=2, verbose=False, **extra)
        try:
            recorders[n_batch], settings = recorded(dict(max_tokens=24, temperature=0.0))
            out = llm.create_completion(prompt, **settings)
            texts[n_batch] = out["choices"][0]["text"]
            shapes[n_batch] = (llm.n_batch, llm.context_params.n_batch, llm.context_params.n_ubatch)
            assert out["usage"]["prompt_tokens"] > 256 + 128 and llm.kv_stats().compressions > 0
        finally:
            llm.close()
    assert shapes == {None: (128, 128, 128), 8: (8, 8, 8), 128: (128, 128, 128), 512: (128, 128, 128)}
    assert texts[128] == texts[512] == texts[None]   # the same decode calls
    # calls of 8 tokens round otherwise: a near tie may go the other way (tests/near_tie.py)
    assert_same_completion(recorders[None], texts[None], recorders[8], texts[8], "n_batch=8")


def test_multi_turn_chat_reuses_the_compressed_cache(smollm2_path: Path) -> None:
    kw = dict(kv_budget=64, kv_buffer=32, seed=3, **THREADS)
    system = {"role": "system", "content": "You are a helpful assistant."}
    turn1 = [system, {"role": "user", "content": "Explain why the sky is blue."}]
    llm = Llama(str(smollm2_path), **kw)
    try:
        out1 = llm.create_chat_completion(messages=turn1, max_tokens=120, temperature=0.0)
        s1 = llm.kv_stats()
        assert s1.compressions > 0 and s1.prompt_tokens_evaluated == out1["usage"]["prompt_tokens"]
        turn2 = turn1 + [out1["choices"][0]["message"], {"role": "user", "content": "Now in one sentence."}]
        out2 = llm.create_chat_completion(messages=turn2, max_tokens=40, temperature=0.0)
        s2 = llm.kv_stats()
        assert out2["choices"][0]["message"]["content"].strip()
        # only what follows the cached conversation was evaluated
        assert s2.prompt_tokens == out2["usage"]["prompt_tokens"]
        assert s2.prompt_tokens_evaluated == s2.prompt_tokens - s1.n_tokens < 30
        assert s2.compressions > s1.compressions and s2.cells_peak <= 96
        # a conversation that departs inside the compressed part (same system prompt, another
        # question) is evaluated from scratch and answered as a fresh instance would
        other = [system, {"role": "user", "content": "Explain why grass is green."}]
        out3 = llm.create_chat_completion(messages=other, max_tokens=120, temperature=0.0)
        s3 = llm.kv_stats()
        assert s3.prompt_tokens_evaluated == out3["usage"]["prompt_tokens"]
    finally:
        llm.close()
    fresh = Llama(str(smollm2_path), **kw)
    try:
        expected = fresh.create_chat_completion(messages=other, max_tokens=120, temperature=0.0)
        f = fresh.kv_stats()
    finally:
        fresh.close()
    assert out3["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    assert out3["usage"] == expected["usage"]
    assert (s3.compressions, s3.evicted_tokens, s3.cells_used) == (f.compressions, f.evicted_tokens, f.cells_used)


# ---------------------------------------------------------------------------
# 4. state and reset
# ---------------------------------------------------------------------------

def test_save_and_load_state_of_a_compressed_cache(tiny: str) -> None:
    prompt = prompt_of(150, seed=31)
    llm = budgeted(tiny)
    try:
        out = take(llm, prompt, 60)
        state = llm.save_state()
        saved = llm.kv_stats()
        assert saved.compressions > 0
        follow = prompt + out + random_tokens(5, seed=32)
        gaps: list[float] = []
        after_save = take(llm, follow, 50, gaps)
        stats_after_save = llm.kv_stats()

        take(llm, prompt_of(120, seed=33), 80)  # something else entirely
        llm.load_state(state)
        restored = llm.kv_stats()
        for field in ("compressions", "evicted_tokens", "cells_used", "cells_peak", "n_tokens", "pos_compacted",
                      "kv_bytes_used"):
            assert getattr(restored, field) == getattr(saved, field), field
        assert_same_greedy(after_save, gaps, take(llm, follow, 50))   # a restored state: tests/near_tie.py
        s = llm.kv_stats()
        assert s.prompt_tokens_evaluated == stats_after_save.prompt_tokens_evaluated == 6
        assert (s.compressions, s.n_tokens) == (stats_after_save.compressions, stats_after_save.n_tokens)
    finally:
        llm.close()


def test_a_restored_state_without_logits_re_evaluates_its_last_token(tiny: str) -> None:
    prompt = prompt_of(200, seed=41)
    llm = budgeted(tiny)
    try:
        llm.eval(prompt)  # compressed while reading the prompt
        state = llm.save_state()
        assert llm.kv_stats().compressions > 0
        gaps: list[float] = []
        direct = take(llm, prompt, 60, gaps)  # the prompt is cached with live logits: sampled at once
        assert llm.kv_stats().prompt_tokens_evaluated == 0
        take(llm, prompt_of(90, seed=42), 30)
        llm.load_state(state)
        restored = take(llm, prompt, 60)
        assert llm.kv_stats().prompt_tokens_evaluated == 1
    finally:
        llm.close()
    # the last token decoded alone, not in the prompt's last batch: a near tie may go the other way
    assert_same_greedy(direct, gaps, restored)


def test_a_state_from_other_settings_is_refused(tiny: str) -> None:
    llm = budgeted(tiny)
    try:
        llm.eval(prompt_of(150, seed=45))
        state = llm.save_state()
    finally:
        llm.close()
    stock = Llama(tiny, n_ctx=256, n_batch=b, **THREADS)  # no budget: no compression state to restore
    try:
        stock.eval(prompt_of(20, seed=44))
        stock_state = stock.save_state()
    finally:
        stock.close()
    for kwargs in (dict(kv_window=4), dict(budget=64), dict(buffer=8)):
        other = budgeted(tiny, **kwargs)
        try:
            other.eval(prompt_of(20, seed=46))
            with pytest.raises(ValueError, match=f"this state was saved with kv_budget={B}, kv_buffer={b}, "
                                                 f"kv_window=8; this Llama has"):
                other.load_state(state)
            assert other.n_tokens == other.kv_stats().cells_used == 20  # untouched
        finally:
            other.close()
    other = budgeted(tiny)
    try:
        other.eval(prompt_of(30, seed=46))
        with pytest.raises(RuntimeError, match="same kv_budget, kv_buffer and kv_window; this Llama was reset"):
            other.load_state(stock_state)
        s = other.kv_stats()
        assert (other.n_tokens, s.cells_used, s.compressions) == (0, 0, 0)
        assert take(other, prompt_of(100, seed=47), 5) and other.kv_stats().compressions > 0
    finally:
        other.close()


def test_llama_cpp_python_state_cache_restores_compressed_conversations(tiny: str) -> None:
    first, second = prompt_of(150, seed=48), prompt_of(120, seed=49)
    kw = dict(max_tokens=40, temperature=0.0)

    def conversation(llm: Llama) -> tuple[GapRecorder, str, int]:
        llm.create_completion(first, **kw)
        held = llm.input_ids[:llm.n_tokens].tolist()  # the prompt and all but the last completion token
        llm.create_completion(second, **kw)  # replaces the sequence in the cache
        recorder, settings = recorded(kw)
        text = llm.create_completion(held + random_tokens(5, seed=50), **settings)["choices"][0]["text"]
        return recorder, text, llm.kv_stats().prompt_tokens_evaluated

    cached = budgeted(tiny)
    try:
        cached.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=1 << 28))
        restored, text, evaluated = conversation(cached)
    finally:
        cached.close()
    # the first completion's state came back from the cache: only the continuation was evaluated
    assert evaluated == 5
    plain = budgeted(tiny)
    try:
        _, _, evaluated_plain = conversation(plain)
    finally:
        plain.close()
    assert evaluated_plain == 150 + 39 + 5  # without the cache: evaluated from scratch
    # the same as going on from the first completion directly, but for a near tie (a restored state:
    # tests/near_tie.py)
    direct = budgeted(tiny)
    try:
        direct.create_completion(first, **kw)
        held = direct.input_ids[:direct.n_tokens].tolist()
        recorder, settings = recorded(kw)
        expected = direct.create_completion(held + random_tokens(5, seed=50), **settings)["choices"][0]["text"]
    finally:
        direct.close()
    assert_same_completion(recorder, expected, restored, text)


def test_reset_of_a_compressed_cache_starts_afresh(tiny: str) -> None:
    prompt = prompt_of(100, seed=51)
    llm = budgeted(tiny)
    try:
        take(llm, prompt_of(180, seed=52), 50)
        assert llm.kv_stats().compressions > 0
        llm.reset()
        s = llm.kv_stats()
        assert (llm.n_tokens, s.cells_used, s.compressions, s.n_tokens, s.pos_compacted) == (0, 0, 0, 0, -1)
        got = llm.create_completion(prompt, max_tokens=100, temperature=0.0)
        got_stats = llm.kv_stats()
    finally:
        llm.close()
    fresh = budgeted(tiny)
    try:
        expected = fresh.create_completion(prompt, max_tokens=100, temperature=0.0)
        assert got["choices"][0]["text"] == expected["choices"][0]["text"]
        assert got_stats.compressions == fresh.kv_stats().compressions > 0
    finally:
        fresh.close()


def test_pickling_keeps_the_budget_and_the_logical_context(tiny: str) -> None:
    llm = budgeted(tiny, n_ctx=1000, kv_method="h2o")
    try:
        clone = pickle.loads(pickle.dumps(llm))
        try:
            assert clone.kv_config == llm.kv_config and clone.n_ctx() == 1000
            assert clone.context_params.n_ctx == PHYSICAL and clone.n_batch == b
        finally:
            clone.close()
    finally:
        llm.close()


def test_a_truncation_into_the_compressed_part_is_refused_not_ignored(tiny: str) -> None:
    llm = budgeted(tiny)
    try:
        llm.eval(prompt_of(200, seed=61))
        assert llm.kv_stats().compressions > 0
        assert not llm._ctx.kv_cache_seq_rm(-1, 10, -1)
        llm.n_tokens = 10  # what llama-cpp-python's own code may do after a failed truncation
        with pytest.raises(RuntimeError, match="compressed past it"):
            llm.eval([5, 6])
        llm.reset()
        llm.eval([1, 5, 6])
        assert llm.kv_stats().n_tokens == 3
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# 5. statistics
# ---------------------------------------------------------------------------

def test_kv_stats_fields(tiny: str) -> None:
    llm = budgeted(tiny)
    try:
        per_cell = _native.bytes_per_cell(llm._ctx.ctx)
        llm.eval(prompt_of(40, seed=71))
        s = llm.kv_stats()
        assert (s.compressions, s.cells_used, s.n_tokens) == (0, 40, 40)
        assert s.kv_bytes_used == s.kv_bytes_full == 40 * per_cell
        greedy(llm, 200)
        s = llm.kv_stats()
        assert s.n_tokens == s.tokens_evaluated == 240
        check_bounded(s)
        assert s.kv_bytes_used == s.cells_used * per_cell and s.kv_bytes_full == 240 * per_cell
        assert s.evicted_tokens == 240 - s.cells_used  # per layer and head: every token not held
        assert 0 < s.pos_compacted < 240 and s.compress_seconds >= 0.0
        n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(llm.model))
        for layer in range(n_layer):
            for head in range(n_head_kv):
                kept = llm.kept_positions(layer, head)
                assert len(kept) == s.cells_used and kept[-1] == 239 and np.all(np.diff(kept) > 0)
    finally:
        llm.close()


# ---------------------------------------------------------------------------
# 6. refusals
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(kv_budget=8, kv_window=8), r"kv_budget \(8\) must exceed kv_window \(8\)"),
    (dict(kv_budget=4), r"kv_budget \(4\) must exceed kv_window \(8\)"),
    (dict(kv_budget=64, kv_buffer=0), "kv_buffer must be at least 1, got 0"),
    (dict(kv_budget=64, kv_buffer=-3), "kv_buffer must be at least 1, got -3"),
    (dict(kv_budget=64, n_batch=0), "n_batch must be at least 1, got 0"),
    (dict(kv_budget=64, kv_method="nope"), "unknown kv_method 'nope'"),
    (dict(kv_budget=64, logits_all=True), "logits_all .* not supported with a kv_budget"),
    (dict(kv_budget=64, embedding=True), "embedding=True is not supported with a kv_budget"),
    (dict(kv_budget=64, draft_model=object()), "draft_model .* not supported with a kv_budget"),
    (dict(kv_budget=64, n_ctx=-5), "n_ctx must be positive"),
    # a budget the context never reaches would never compress (and would allocate its cells at once)
    (dict(kv_budget=10**6), r"kv_budget \+ kv_buffer \(1000000 \+ 128\) exceeds the model's training context \(4096"),
    (dict(kv_budget=64, kv_lambda=float("nan")), r"lambda must lie in \[0, 1\], got nan"),
    (dict(kv_budget=64, kv_lambda=1.5), r"lambda must lie in \[0, 1\]"),
    (dict(kv_budget=64, kv_window=0), "kv_window must be at least 1, got 0"),
])
def test_bad_settings_are_refused_before_loading(tiny: str, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Llama(tiny, **THREADS, **kwargs)


@pytest.mark.parametrize("budget", [None, 64])
def test_a_closed_instance_raises_instead_of_crashing(tiny: str, budget) -> None:
    llm = Llama(tiny, n_ctx=256, kv_budget=budget, kv_buffer=32, **THREADS)
    llm.create_completion("Hello", max_tokens=2)
    llm.close()
    for use in (lambda: llm.create_completion("Hello", max_tokens=2), lambda: llm.tokenize(b"Hello"),
                lambda: llm.eval([1, 2]), lambda: llm.kv_stats(), lambda: llm.save_state(),
                lambda: llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}])):
        with pytest.raises(RuntimeError, match="closed"):
            use()
    llm.close()  # twice is fine


def test_an_unsupported_model_is_refused_with_the_reason(tiny_model) -> None:
    with pytest.raises(ValueError, match="cannot compress this model's KV cache: .*recurrent"):
        Llama(str(tiny_model(arch="mamba")), kv_budget=64, **THREADS)


def test_logprobs_are_refused_with_a_budget(tiny: str) -> None:
    llm = budgeted(tiny)
    try:
        message = "logprobs are not supported with a kv_budget"
        with pytest.raises(ValueError, match=message):
            llm.create_completion("Hello", max_tokens=4, logprobs=1)
        with pytest.raises(ValueError, match=message):
            llm("Hello", max_tokens=4, logprobs=0, stream=True)
        with pytest.raises(ValueError, match=message):
            llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], logprobs=True, top_logprobs=2)
        # nothing was evaluated, and the instance still works
        assert llm.n_tokens == 0
        assert llm.create_completion("Hello", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] <= 4
    finally:
        llm.close()


def test_logit_bias_and_a_logits_processor_both_apply(tiny: str, eog_ids) -> None:
    """llama-cpp-python composes them with `list.extend`, which returns None: both were dropped
    (issue 21, item 8: the server's min_tokens lost every logit_bias)."""
    calls = [0]

    def count(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return scores

    for budget in (None, B):
        llm = Llama(tiny, n_ctx=256, **THREADS) if budget is None else budgeted(tiny)
        try:
            processors = llama_cpp.LogitsProcessorList([count])
            out = llm.create_completion([1, 2, 3], max_tokens=3, temperature=0.0, logit_bias={4242: 1000.0},
                                        logits_processor=processors)
            assert out["choices"][0]["text"] == llm.detokenize([4242] * 3).decode()
            assert calls[0] >= 3 and len(processors) == 1   # the caller's list is left as it was
        finally:
            llm.close()
