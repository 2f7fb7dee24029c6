"""Every ``rkv-local`` command the README shows, run as written, must answer.

Only lengths are shortened (fewer generated tokens, problems, texts), so the suite stays fast;
everything else (model, prompt, budget, method) is the README's own. A command that exits 0 but
prints nothing is a failure: that is how the first `generate` example once shipped.
"""
from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 600
SERVER_START_TIMEOUT_S = 120
# option -> shorter value; the other options stay as written
SHORTER = {"--max-tokens": "16", "--lengths": "64", "--limit": "1", "--prompt-tokens": "32"}
# options the README leaves at their (long) defaults, per command
EXTRA = {
    ("bench",): {"--prompt-tokens": "32", "--sample-every": "16"},
    ("eval", "fidelity"): {"--texts": "1", "--length": "320"},
    ("eval", "tasks"): {"--max-tokens": "16"},
}


def readme_commands() -> List[str]:
    """The `rkv-local ...` lines of the README's shell blocks."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.startswith("rkv-local ")]


def shortened(command: str) -> List[str]:
    argv = shlex.split(command, comments=True)[1:]
    for i, arg in enumerate(argv[:-1]):
        if arg in SHORTER:
            argv[i + 1] = SHORTER[arg]
    for prefix, extra in EXTRA.items():
        if tuple(argv[:len(prefix)]) == prefix:
            for option, value in extra.items():
                if option not in argv:
                    argv += [option, value]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv: List[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rkv_local", *argv], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=cwd)


def serve_and_ask(argv: List[str], cwd: Path) -> str:
    """Start the README's server on a free port, ask one chat question, return the answer."""
    port = free_port()
    argv = [str(port) if prev == "--port" else a for prev, a in zip([""] + argv, argv)]
    proc = subprocess.Popen([sys.executable, "-m", "rkv_local", *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                urllib.request.urlopen(f"{base}/models", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 16})
        request = urllib.request.Request(f"{base}/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=TIMEOUT_S).read())
        return answer["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def readme_python() -> List[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_shows_each_command() -> None:
    shown = {shortened(c)[0] for c in readme_commands()}
    assert {"generate", "chat", "inspect", "serve", "bench", "eval"} <= shown


@contextmanager
def rpc_server_for(argv: List[str]) -> Iterator[List[str]]:
    """With --rpc, the command as written against an rpc-server started on a free loopback port."""
    if "--rpc" not in argv:
        yield argv
        return
    from rkv_local.rpc import RpcServerError, check_alive, rpc_server_path

    port = free_port()
    proc = subprocess.Popen([str(rpc_server_path()), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            try:
                check_alive(f"127.0.0.1:{port}", timeout_s=1.0)
                break
            except RpcServerError:
                assert proc.poll() is None and time.monotonic() < deadline, "rpc-server did not start"
                time.sleep(0.1)
        i = argv.index("--rpc") + 1
        yield argv[:i] + [f"127.0.0.1:{port}"] + argv[i + 1:]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_answers(command: str, tmp_path: Path) -> None:
    with rpc_server_for(shortened(command)) as argv:
        answers(argv, tmp_path)


def answers(argv: List[str], tmp_path: Path) -> None:
    if argv[0] == "serve":
        assert serve_and_ask(argv, tmp_path).strip()
        return
    result = run(argv, tmp_path, stdin="What is 2 + 2?\n" if argv[0] == "chat" else "")
    assert result.returncode == 0, f"{argv}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"{argv} printed nothing\nstderr: {result.stderr[-2000:]}"
    if argv[0] == "generate":
        assert not re.search(r"tokens 0 \(prompt", result.stderr), result.stderr


@pytest.mark.parametrize("code", readme_python())
def test_readme_python_answers(code: str, tmp_path: Path) -> None:
    code = re.sub(r"max_tokens=\d+", "max_tokens=16", code)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    answer, stats = result.stdout.strip().splitlines()[0], result.stdout.strip().splitlines()[-1]
    assert answer.strip() and stats.startswith("KVStats(")
