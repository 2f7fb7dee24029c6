"""KVSettings: every kv_* setting validated in one place, and from it the CLI's options, a pickled
Llama's arguments, the evaluations' configurations; and KVStats built in one place for a Llama, a
BatchedLlama sequence and a request's view (issue 36)."""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import subprocess
import sys

import pytest

from rkv_local import BatchedLlama, Llama
from rkv_local.evals.runs import RunConfig
from rkv_local.settings import KVSettings, option_names

B, BUFFER, KEEP = 32, 16, 24


@pytest.fixture(scope="module")
def tiny(tiny_model) -> str:
    return str(tiny_model(arch="llama"))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(kv_keep_prompt=True), TypeError, "kv_keep_prompt must be a whole number, got True"),
    (dict(kv_budget=True), TypeError, "kv_budget must be a whole number"),
    (dict(kv_budget=64.0), TypeError, "kv_budget must be a whole number"),
    (dict(kv_lambda=1.5), ValueError, r"kv_lambda must lie in \[0, 1\], got 1.5"),
    (dict(kv_lambda=-0.1), ValueError, "kv_lambda must lie in"),
    (dict(kv_lambda=True), ValueError, "kv_lambda must lie in"),
    (dict(kv_method="snap"), ValueError, "unknown kv_method 'snap'; choose one of rkv, snapkv"),
    (dict(kv_compress="answer"), ValueError, "unknown kv_compress"),
    (dict(kv_keep_prompt=-1), ValueError, "kv_keep_prompt must be 0 or more, got -1"),
    (dict(kv_window=0), ValueError, "kv_window must be at least 1"),
])
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, kwargs, error, message):
    """Refused by the settings, before llama.cpp reads anything: the model file does not even exist."""
    with pytest.raises(error, match=message):
        KVSettings(**{"kv_budget": 64, **kwargs})
    with pytest.raises(error, match=message):
        Llama(tmp_path / "no-model.gguf", **{"kv_budget": 64, **kwargs})


def test_the_cli_refuses_lambda_before_loading(tmp_path):
    """λ was checked only by the engine, after the model loaded (issue 36)."""
    result = subprocess.run([sys.executable, "-m", "rkv_local", "generate", str(tmp_path / "no-model.gguf"), "hi",
                             "--kv-budget", "64", "--kv-lambda", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "rkv-local: error: --kv-lambda must lie in [0, 1], got 2.0"


def test_every_setting_is_an_option_and_survives_pickling(tiny, tmp_path):
    parser = argparse.ArgumentParser()
    KVSettings.add_arguments(parser)
    options = {a.dest for a in parser._actions}
    assert set(KVSettings.names()) <= options
    args = parser.parse_args(["--kv-budget", "40", "--kv-lambda", "0.3", "--kv-keep-prompt", "8"])
    assert KVSettings.from_args(args) == KVSettings(kv_budget=40, kv_lambda=0.3, kv_keep_prompt=8)
    with pytest.raises(ValueError, match="--kv-buffer must be at least 1"):
        KVSettings.from_args(parser.parse_args(["--kv-budget", "40", "--kv-buffer", "0"]))
    assert option_names("kv_think_end and kv_budget") == "--kv-think-end and --kv-budget"

    settings = KVSettings(kv_budget=B, kv_buffer=BUFFER, kv_method="snapkv", kv_window=4, kv_lambda=0.3,
                          kv_keep_prompt=KEEP)
    llm = Llama(tiny, n_ctx=256, verbose=False, **settings.to_kwargs())
    try:
        assert llm.kv_settings == settings
        again = pickle.loads(pickle.dumps(llm))
        try:
            assert again.kv_settings == settings and again.n_ctx() == 256
        finally:
            again.close()
    finally:
        llm.close()
    assert RunConfig("snapkv", B, BUFFER, 4, 0.3).kv_settings() == dataclasses.replace(settings, kv_keep_prompt=0)
    assert KVSettings().to_kwargs() == {} and RunConfig("full").llama_kwargs() == {}


def test_batched_sequence_stats_count_the_kept_prompt_and_the_requests_tokens(tiny):
    """BatchedLlama.kv_stats(seq) left out cells_kept and compression_paused and gave cells_max without
    the kept prompt; a request's view dropped the token counters, so /rkv/stats' last_finished showed
    0 prompt tokens (issue 36)."""
    batch = BatchedLlama(tiny, n_seq_max=2, n_ctx=512, kv_budget=B, kv_buffer=BUFFER, kv_keep_prompt=KEEP,
                         verbose=False)
    try:
        prompt = list(range(10, 50))
        with batch.sequence() as view:
            view.create_completion(prompt, max_tokens=60, temperature=0.0)
            mine = view.kv_stats()
            seq = batch.kv_stats(view.seq_id)
            total = batch.kv_stats()
        assert mine.prompt_tokens == len(prompt) and mine.prompt_tokens_evaluated == len(prompt)
        assert mine.tokens_evaluated >= len(prompt) + 59
        for stats in (mine, seq):
            assert stats.cells_max == KEEP + B + BUFFER
            assert stats.cells_kept == KEEP and stats.compressions > 0 and not stats.compression_paused
        assert total.cells_kept == KEEP and total.cells_max == batch.cells_per_seq * 2
    finally:
        batch.close()


def test_a_llamas_stats_and_a_batched_sequences_agree(tiny):
    """One builder: the same settings and tokens give the same figures in both."""
    prompt = list(range(10, 50))
    llm = Llama(tiny, n_ctx=512, kv_budget=B, kv_buffer=BUFFER, kv_keep_prompt=KEEP, verbose=False)
    batch = BatchedLlama(tiny, n_seq_max=1, n_ctx=512, kv_budget=B, kv_buffer=BUFFER, kv_keep_prompt=KEEP,
                         verbose=False)
    try:
        llm.create_completion(prompt, max_tokens=60, temperature=0.0)
        with batch.sequence() as view:
            view.create_completion(prompt, max_tokens=60, temperature=0.0)
            theirs = view.kv_stats()
        mine = llm.kv_stats()
        same = ("method", "budget", "buffer", "cells_max", "cells_kept", "n_ctx", "prompt_tokens",
                "prompt_tokens_evaluated")
        assert {f: getattr(mine, f) for f in same} == {f: getattr(theirs, f) for f in same}
    finally:
        llm.close()
        batch.close()
