"""The ``rkv-local`` command, run as a subprocess (``python -m rkv_local.cli``).

Tiny random models keep the mechanics fast; SmolLM2-135M is used where the text must make
sense (chat); the HTTP server has tests/test_server.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

CLI = [sys.executable, "-m", "rkv_local.cli"]
TIMEOUT_S = 120
SUMMARY = re.compile(
    r"rkv-local: tokens (?P<tokens>\d+) \(prompt (?P<prompt>\d+)(?:, (?P<evaluated>\d+) evaluated)?\), "
    r"cells in use (?P<cells>\d+) "
    r"\((?:peak (?P<peak>\d+), (?:prompt kept (?P<kept>\d+), )?budget (?P<budget>\d+) \+ buffer (?P<buffer>\d+), "
    r"(?P<method>\w+)\), "
    r"compressions (?P<compressions>\d+)|full cache\)).*finish (?P<finish>\w+)"
)


def run_cli(*args: Any, input: Optional[str] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        CLI + [str(a) for a in args], input=input if input is not None else "", capture_output=True, text=True,
        timeout=TIMEOUT_S, cwd=cwd,
    )


def summaries(stderr: str) -> List[Dict[str, Optional[str]]]:
    return [m.groupdict() for m in SUMMARY.finditer(stderr)]


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("generate", "chat", "inspect", "serve"):
        assert command in result.stdout
    result = run_cli("generate", "--help")
    assert result.returncode == 0
    for option in ("--kv-budget", "--kv-buffer", "--kv-method", "--kv-window", "--kv-lambda", "--max-tokens",
                   "--temperature", "--seed", "--n-threads", "--n-gpu-layers", "--n-ctx"):
        assert option in result.stdout


@pytest.mark.parametrize("command", ["generate", "chat", "inspect", "serve", "bench", "eval fidelity", "eval tasks"])
def test_each_command_help_shows_an_example(command: str) -> None:
    result = run_cli(*command.split(), "--help")
    assert result.returncode == 0
    assert f"example:\n  rkv-local {command} " in result.stdout


def test_options_may_come_before_the_prompt(tiny_model) -> None:
    model = tiny_model(arch="llama")
    options = ["--kv-budget", "32", "--kv-buffer", "16", "--max-tokens", "40", "--ignore-eos"]
    after = run_cli("generate", model, "Once upon a time", *options)
    before = run_cli("generate", model, *options, "Once upon a time")
    assert after.returncode == 0 and before.returncode == 0, before.stderr
    assert before.stdout == after.stdout != ""


def test_generate_streams_far_beyond_the_budget(tiny_model) -> None:
    model = tiny_model(arch="llama")
    proc = subprocess.Popen(
        CLI + ["generate", str(model), "Once upon a time", "--kv-budget", "32", "--kv-buffer", "16",
               "--max-tokens", "200", "--ignore-eos"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        first = os.read(proc.stdout.fileno(), 1)
        # text arrives while the other ~199 tokens are still being generated
        assert first and proc.poll() is None
        rest, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert len((first + rest).decode("utf-8", "replace").strip()) > 0
    (summary,) = summaries(err.decode())
    assert int(summary["tokens"]) == 200
    assert int(summary["compressions"]) > 0
    assert int(summary["peak"]) <= 32 + 16
    assert (summary["budget"], summary["buffer"], summary["method"]) == ("32", "16", "rkv")
    assert summary["finish"] == "length"


def test_generate_reads_the_prompt_from_stdin(tiny_model) -> None:
    model = tiny_model(arch="llama")
    common = ["--max-tokens", "24", "--ignore-eos"]
    from_arg = run_cli("generate", model, "The quick brown fox", *common)
    from_stdin = run_cli("generate", model, *common, input="The quick brown fox")
    assert from_arg.returncode == 0 and from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_arg.stdout != ""  # greedy: the same prompt gives the same text
    (summary,) = summaries(from_stdin.stderr)
    assert summary["tokens"] == "24" and summary["budget"] is None  # no --kv-budget: a full cache
    assert "full cache" in from_stdin.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--kv-budget", "8", "--kv-window", "8"], "must exceed --kv-window"),
        (["--kv-budget", "64", "--kv-buffer", "0"], "kv-buffer"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tiny_model, options: List[str], message: str) -> None:
    result = run_cli("generate", tiny_model(arch="llama"), "hello", *options)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rkv-local: error:") and message in lines[0]
    assert result.stdout == ""


def test_generate_uses_the_chat_template_unless_raw(smollm2_path: Path) -> None:
    # SmolLM2-Instruct given raw text ends at once; through its template it answers
    chat = run_cli("generate", smollm2_path, "What is the capital of France?", "--max-tokens", "24")
    raw = run_cli("generate", smollm2_path, "What is the capital of France?", "--max-tokens", "24", "--raw")
    assert chat.returncode == 0 and raw.returncode == 0, chat.stderr + raw.stderr
    assert chat.stdout.strip()
    (chat_summary,), (raw_summary,) = summaries(chat.stderr), summaries(raw.stderr)
    # the template wraps the question (system prompt, role markers): a longer prompt than the raw text
    assert int(chat_summary["prompt"]) > int(raw_summary["prompt"]) + 10
    assert chat.stdout != raw.stdout


def test_generate_system_needs_the_template(smollm2_path: Path) -> None:
    result = run_cli("generate", smollm2_path, "hi", "--raw", "--system", "Be brief.")
    assert result.returncode == 2 and "--system" in result.stderr and result.stdout == ""


def test_unknown_model_exits_2() -> None:
    result = run_cli("generate", "no-such-model.gguf", "hello")
    assert result.returncode == 2
    assert "no-such-model.gguf" in result.stderr and "known" in result.stderr


def test_chat_answers_each_line_until_eof(smollm2_path: Path) -> None:
    result = run_cli("chat", smollm2_path, "--kv-budget", "32", "--kv-buffer", "16", "--max-tokens", "40",
                     "--kv-keep-prompt", "0", input="What is 2+2?\nWhat is the capital of Germany?\n")
    assert result.returncode == 0, result.stderr
    first, second = summaries(result.stderr)
    # the second turn's prompt carries the whole conversation, so the cache had to compress
    assert int(second["prompt"]) > int(first["prompt"]) + int(first["tokens"])
    assert int(second["compressions"]) > 0 and int(second["peak"]) <= 48
    assert second["kept"] is None   # --kv-keep-prompt 0: nothing kept
    assert "4" in result.stdout and "Berlin" in result.stdout


def test_chat_keeps_its_first_prompt_and_evaluates_only_each_turns_new_tokens(smollm2_path: Path) -> None:
    result = run_cli("chat", smollm2_path, "--kv-budget", "32", "--kv-buffer", "16", "--max-tokens", "60",
                     input="Tell me a story about a robot who learns to paint.\nWhat is the capital of Germany?\n")
    assert result.returncode == 0, result.stderr
    first, second = summaries(result.stderr)
    assert int(first["tokens"]) == 60 and int(first["compressions"]) > 0
    assert int(first["kept"]) == int(first["prompt"])
    # the second turn's prompt holds the first answer (no thinking to drop): the cache goes on from
    # it, the first prompt still kept whole, and evaluates only the new question
    assert int(second["evaluated"]) < int(second["prompt"]) - int(first["prompt"]) - int(first["tokens"]) + 8
    assert int(second["kept"]) == int(first["kept"])
    assert int(second["peak"]) <= int(second["kept"]) + 48
    assert "Berlin" in result.stdout


def test_chat_exit_command_stops(tiny_model) -> None:
    result = run_cli("chat", tiny_model(arch="llama"), "--max-tokens", "5", input="hello\n/exit\nnever answered\n")
    assert result.returncode == 0, result.stderr
    assert len(summaries(result.stderr)) == 1


def test_inspect_shows_and_writes_kept_tokens(tiny_model, tmp_path: Path) -> None:
    # 2 layers x 2 KV heads; --compress-now leaves exactly the budget in every head
    model = tiny_model(arch="llama", n_layer=2, n_head=4, n_head_kv=2)
    out = tmp_path / "view.html"
    result = run_cli("inspect", model, "The capital of France is Paris. The capital of Germany is",
                     "--kv-budget", "16", "--kv-buffer", "8", "--max-tokens", "40", "--ignore-eos",
                     "--compress-now", "--layer", "1", "--head", "0", "--color", "always", "--html", out)
    assert result.returncode == 0, result.stderr
    assert "layer 1, KV head 0" in result.stdout and "KV head 1" not in result.stdout
    assert "\x1b[30;43m" in result.stdout and "\x1b[2m" in result.stdout  # kept highlighted, evicted dim
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('<section class="layer"') == 2
    heads = re.findall(r'<div class="head" data-layer="(\d+)" data-head="(\d+)">', page)
    assert sorted(heads) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    n_kept = page.count('class="tok kept"')
    n_evicted = page.count('class="tok evicted"')
    assert n_kept == 4 * 16
    n_tokens = (n_kept + n_evicted) // 4
    assert n_evicted == 4 * (n_tokens - 16) and n_tokens > 40
    assert re.search(r'<span class="tok kept" title="position \d+ ', page)
    # no colour: evicted tokens become dots
    plain = run_cli("inspect", model, "Hello", "--max-tokens", "4", "--ignore-eos", "--color", "never", "--html", "")
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout


def test_inspect_rejects_a_missing_layer(tiny_model, tmp_path: Path) -> None:
    result = run_cli("inspect", tiny_model(arch="llama"), "Hello", "--layer", "7", "--max-tokens", "2", cwd=tmp_path)
    assert result.returncode == 2 and "--layer 7" in result.stderr
    assert not (tmp_path / "rkv-inspect.html").exists()


def test_inspect_shows_the_compressed_layers_of_a_sliding_window_model(tiny_model, tmp_path: Path) -> None:
    # tiny gpt-oss, 4 layers: 0 and 2 have a window (llama.cpp's), 1 and 3 full attention (the budget's)
    model = tiny_model(arch="gpt-oss", n_layer=4, n_head=4, n_head_kv=2, head_dim=32)
    out = tmp_path / "view.html"
    result = run_cli("inspect", model, "The capital of France", "--raw", "--kv-budget", "16", "--kv-buffer", "8",
                     "--max-tokens", "30", "--ignore-eos", "--color", "never", "--html", out)
    assert result.returncode == 0, result.stderr
    assert "layer 1, KV head 0" in result.stdout  # the first compressed layer, by default
    page = out.read_text(encoding="utf-8")
    assert re.findall(r'<section class="layer" id="layer-(\d+)"', page) == ["1", "3"]
    refused = run_cli("inspect", model, "Hello", "--raw", "--kv-budget", "16", "--kv-buffer", "8", "--layer", "0",
                      "--max-tokens", "2", cwd=tmp_path)
    assert refused.returncode == 2
    assert "--layer 0 is a sliding-window layer" in refused.stderr and "layers 1, 3" in refused.stderr
