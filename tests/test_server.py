"""``rkv-local serve``: the OpenAI-compatible server on one ``BatchedLlama``, driven by the real
``openai`` client against the server run as a subprocess on a free loopback port.

SmolLM2-135M with a budget of 32 + 16 cells, so every answer is compressed on its way.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from near_tie import assert_same_unless_a_near_tie, recorded

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
openai = pytest.importorskip("openai")

CLI = [sys.executable, "-m", "rkv_local.cli"]
# one thread: ggml's threads wait for each other spinning, so on a machine whose cores are busy
# elsewhere two threads per decode crawl (seconds a token on two busy cores, against 40 tokens a second with one)
BUDGET = ["--kv-budget", "32", "--kv-buffer", "16", "--n-threads", "1"]
START_TIMEOUT_S = 120
TIMEOUT_S = 120
QUESTIONS = ["What is 2+2?", "Name three fruits.", "Why is the sky blue?", "What is the capital of France?",
             "Tell me about cats.", "How do birds fly?"]

SHORT_CTX = 128

# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>) ruled out: an answer that runs to max_tokens
NO_END = {"0": -100.0, "2": -100.0}
SERVER_REPEAT_PENALTY = 1.1   # llama-cpp-python's server requests' default (Llama's: 1.0)


def chat(question: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": question}]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.stopped = False   # a test stopped it
        self.base = f"http://127.0.0.1:{port}"

    def client(self, api_key: str = "none", timeout: float = TIMEOUT_S) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def get(self, path: str, api_key: Optional[str] = None) -> Dict[str, Any]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with urllib.request.urlopen(urllib.request.Request(self.base + path, headers=headers), timeout=10) as r:
            return json.load(r)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model: Path, tmp_path: Path, *options: str) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path / f"serve-{port}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(CLI + ["serve", str(model), "--port", str(port), *options],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                server.get("/health")
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, f"the server did not start: {log.read_text()[-3000:]}"
                time.sleep(0.2)
        yield server
        assert server.stopped or proc.poll() is None, f"the server died: {log.read_text()[-3000:]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server_short(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two sequences with a logical context of SHORT_CTX tokens: an answer without an end runs
    into the context after a few seconds (and through several compressions of 32 + 16 cells)."""
    with serve(smollm2_path, tmp_path_factory.mktemp("server_short"), *BUDGET, "--parallel", "2",
               "--n-ctx", str(SHORT_CTX), "--model-alias", "smol") as server:
        yield server


@pytest.fixture(scope="module")
def server4(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(smollm2_path, tmp_path_factory.mktemp("server4"), *BUDGET, "--parallel", "4",
               "--model-alias", "smol") as server:
        yield server


def _stream_chat(client: "openai.OpenAI", messages: List[Dict[str, str]], max_tokens: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {"text": "", "finish": None, "role": None}
    stream = client.chat.completions.create(model="smol", messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True)
    for chunk in stream:
        choice = chunk.choices[0]
        out["role"] = out["role"] or choice.delta.role
        out["text"] += choice.delta.content or ""
        if choice.finish_reason:
            assert out["finish"] is None, "two chunks with a finish_reason"
            out["finish"] = choice.finish_reason
    return out


def wait_for(server: Server, ready: Callable[[Dict[str, Any]], bool], what: str, api_key: Optional[str] = None,
             timeout: float = TIMEOUT_S) -> Dict[str, Any]:
    """``GET /rkv/stats`` until ``ready`` says so: a state the server reaches, not a time it takes."""
    deadline = time.monotonic() + timeout
    while True:
        stats = server.get("/rkv/stats", api_key=api_key)
        if ready(stats):
            return stats
        assert time.monotonic() < deadline, f"{what}: {stats}"
        time.sleep(0.05)


def _post(server: Server, path: str, body: Any, timeout: float = TIMEOUT_S) -> Tuple[int, Any]:
    """(HTTP status, the JSON answer, or the list of a stream's events) of a raw POST: the body goes
    as given, fields the openai client would not send included."""
    request = urllib.request.Request(server.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
            if response.headers.get_content_type() == "text/event-stream":
                events = [e for e in text.replace("\r\n", "\n").strip().split("\n\n") if not e.startswith(":")]
                return response.status, events
            return response.status, json.loads(text)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def _stream_text(events: List[str]) -> Tuple[str, Optional[str]]:
    """(the text, the finish_reason) of a completions or chat stream's events, which must end with [DONE]."""
    assert events[-1] == "data: [DONE]", events[-3:]
    text, finish = "", None
    for event in events[:-1]:
        assert event.startswith("data: {"), event
        choice = json.loads(event[len("data: "):])["choices"][0]
        text += choice.get("text") or choice.get("delta", {}).get("content") or ""
        assert finish is None, "a piece after the finish_reason"
        finish = choice["finish_reason"]
    return text, finish


def _in_threads(fn, args: List[Any]) -> List[Any]:
    results: List[Any] = [None] * len(args)

    def run(i: int) -> None:
        try:
            results[i] = fn(args[i])
        except BaseException as exc:  # noqa: BLE001 - checked by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    return results


def lone_gaps(model: Path, requests: List[Tuple[Any, Dict[str, Any]]]) -> List[List[float]]:
    """The gaps between the two best logits on the way of each (prompt or chat, settings) answered
    alone, by a ``Llama`` set as the server's sequences are. Requests the server decodes together
    round otherwise than alone, and a near tie may then go the other way (tests/near_tie.py): the
    server's steps cannot be recorded from here, so any near tie of the lone run excuses a difference."""
    from rkv_local import Llama

    llm = Llama(str(model), kv_budget=32, kv_buffer=16, n_threads=1, verbose=False)
    try:
        gaps = []
        for prompt, settings in requests:
            recorder, as_served = recorded(dict(settings, repeat_penalty=SERVER_REPEAT_PENALTY))
            if isinstance(prompt, str):
                llm.create_completion(prompt, **as_served)
            else:
                llm.create_chat_completion(prompt, **as_served)
            gaps.append(recorder.gaps)
        return gaps
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------


def test_concurrent_streams_each_get_their_answer_alone(server4: Server, smollm2_path: Path) -> None:
    client = server4.client()
    questions = QUESTIONS[:4]
    alone = []
    for q in questions:
        reply = client.chat.completions.create(model="smol", messages=chat(q), max_tokens=32, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        alone.append(reply.choices[0].message.content)
    assert all(a.strip() for a in alone)

    streams = _in_threads(lambda q: _stream_chat(client, chat(q), 32), questions)
    gaps = lone_gaps(smollm2_path, [(chat(q), dict(max_tokens=32, temperature=0)) for q in questions])
    for q, s, expected, lone in zip(questions, streams, alone, gaps):
        assert not isinstance(s, BaseException), s
        assert s["role"] == "assistant"
        assert s["finish"] in ("stop", "length"), (q, s)
        assert_same_unless_a_near_tie(expected, lone, s["text"], q)
    # they ran together: the scheduler decoded several of them in one call (counted, not timed)
    assert server4.get("/rkv/stats")["scheduler"]["max_sequences"] >= 2


def test_completions_chat_and_models_without_streaming(server4: Server) -> None:
    client = server4.client()
    assert [m.id for m in client.models.list().data] == ["smol"]

    completion = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=16,
                                           temperature=0)
    assert completion.object == "text_completion" and completion.model == "smol"
    assert completion.choices[0].text.strip() and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0

    reply = client.chat.completions.create(model="smol", messages=chat("Why is the sky blue?"),
                                           max_tokens=24, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content.strip()
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens > 48

    # the chat went through a budgeted sequence: prompt and answer overflow 32 + 16 cells
    stats = server4.get("/rkv/stats")
    last = stats["last_finished"]
    assert (last["method"], last["budget"], last["buffer"]) == ("rkv", 32, 16)
    assert last["compressions"] > 0 and last["cells_peak"] <= 48
    assert stats["parallel"] == 4 and len(stats["sequences"]) == 4
    assert all(s["cells_max"] == 48 and not s["busy"] for s in stats["sequences"])

    # per-request sampling settings reach the sequence: no end-of-generation token, so max_tokens
    long = client.completions.create(model="smol", prompt="Hello.", max_tokens=24, temperature=0, logit_bias=NO_END)
    assert (long.usage.completion_tokens, long.choices[0].finish_reason) == (24, "length")

    # min_tokens holds the end back (the plain answer is shorter)
    plain = client.chat.completions.create(model="smol", messages=chat("What is 2+2?"), max_tokens=30, temperature=0)
    held = client.chat.completions.create(model="smol", messages=chat("What is 2+2?"), max_tokens=30, temperature=0,
                                          extra_body={"min_tokens": 16})
    assert plain.usage.completion_tokens < 16 <= held.usage.completion_tokens
    assert held.choices[0].message.content.startswith(plain.choices[0].message.content)

    # what a sequence view cannot do is refused, clearly
    with pytest.raises(openai.BadRequestError, match="n is not supported"):
        client.chat.completions.create(model="smol", messages=chat("Hi"), max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="smol", prompt="Hi", max_tokens=4, logprobs=2)


def test_malformed_requests_get_a_4xx_and_the_server_goes_on(server4: Server) -> None:
    def post(body: bytes) -> urllib.error.HTTPError:
        request = urllib.request.Request(server4.base + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        return info.value

    for body in (b'{"messages": [', b"not json at all", b'{"messages": [], "max_tokens": "many"}'):
        error = post(body)
        assert 400 <= error.code < 500
        assert json.load(error)["error"]["message"]
    assert server4.get("/v1/models")["data"][0]["id"] == "smol"


def test_serve_listens_on_loopback_by_default(server4: Server) -> None:
    """No --host given: the listening socket is bound to 127.0.0.1 only."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("needs Linux's /proc/net/tcp")
    listening = []
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) == server4.port:  # 0A: LISTEN
            listening.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    assert listening == ["127.0.0.1"]
    assert f"http://127.0.0.1:{server4.port}/v1" in server4.log.read_text()


def test_unknown_fields_are_ignored_and_the_answer_is_the_same(server_short: Server) -> None:
    """Fields of newer OpenAI API versions (or of nobody's) change nothing: the answer is the one
    of the same request without them, as with llama-cpp-python's own server."""
    unknown = {"frobnicate": True, "service_tier": "auto",
               "metadata": {"who": "test"}, "store": False, "parallel_tool_calls": False}
    plain = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    status, alone = _post(server_short, "/v1/completions", plain)
    assert status == 200 and alone["choices"][0]["text"].strip()
    status, with_unknown = _post(server_short, "/v1/completions", {**plain, **unknown})
    assert status == 200
    assert with_unknown["choices"] == alone["choices"] and with_unknown["usage"] == alone["usage"]

    chat_plain = {"messages": chat("Name three fruits."), "max_tokens": 12, "temperature": 0}
    status, alone = _post(server_short, "/v1/chat/completions", chat_plain)
    assert status == 200 and alone["choices"][0]["message"]["content"].strip()
    odd_messages = [{**m, "weird": 1, "cache_control": {"type": "ephemeral"}} for m in chat_plain["messages"]]
    for body in ({**chat_plain, **unknown}, {**chat_plain, "messages": odd_messages}):
        status, answer = _post(server_short, "/v1/chat/completions", body)
        assert status == 200, answer
        assert answer["choices"] == alone["choices"] and answer["usage"] == alone["usage"]
    status, events = _post(server_short, "/v1/chat/completions", {**chat_plain, **unknown, "stream": True})
    assert status == 200
    assert _stream_text(events) == (alone["choices"][0]["message"]["content"], alone["choices"][0]["finish_reason"])
    assert server_short.get("/health") == {"status": "ok"}


def test_max_completion_tokens_limits_a_chat_as_max_tokens_does(server_short: Server) -> None:
    """The openai client's newer name for the limit is honoured, not ignored as an unknown field
    (which would let the answer run to the end of the context)."""
    client = server_short.client()
    question = chat("Tell me about cats.")
    by_old_name = client.chat.completions.create(model="smol", messages=question, max_tokens=6, temperature=0,
                                                 logit_bias=NO_END)
    by_new_name = client.chat.completions.create(model="smol", messages=question, max_completion_tokens=6,
                                                 temperature=0, logit_bias=NO_END)
    assert (by_new_name.usage.completion_tokens, by_new_name.choices[0].finish_reason) == (6, "length")
    assert by_new_name.choices[0].message.content == by_old_name.choices[0].message.content
    both = client.chat.completions.create(model="smol", messages=question, max_tokens=6, max_completion_tokens=6,
                                          temperature=0, logit_bias=NO_END)
    assert both.choices[0].message.content == by_old_name.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="differ") as info:
        client.chat.completions.create(model="smol", messages=question, max_tokens=6, max_completion_tokens=8)
    assert info.value.body["param"] == "max_completion_tokens"


def test_content_as_text_parts_or_null_reads_as_text(server_short: Server) -> None:
    """Many OpenAI clients send a message's content as a list of parts, and null for an assistant's
    tool call: both gave a 500 (issue 22)."""
    client = server_short.client()
    greedy = dict(model="smol", max_tokens=8, temperature=0, logit_bias=NO_END)
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "Name three fruits.\nBe brief."}],
                                           **greedy)
    parts = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Name three fruits."}, {"type": "text", "text": "Be brief."}]}], **greedy)
    assert parts.choices[0].message.content == plain.choices[0].message.content
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "Name three fruits."}]
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "Name three fruits."}]
    assert (client.chat.completions.create(messages=history, **greedy).choices[0].message.content
            == client.chat.completions.create(messages=empty, **greedy).choices[0].message.content)
    with pytest.raises(openai.BadRequestError, match="content part of type 'image_url'") as info:
        client.chat.completions.create(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}], **greedy)
    assert info.value.body["param"] == "messages.0.content"


def test_stream_options_include_usage_ends_a_stream_with_its_usage(server_short: Server) -> None:
    """stream_options.include_usage was ignored: clients that count tokens from streams got none."""
    client = server_short.client()
    for create, request in ((client.chat.completions.create, dict(messages=chat("Tell me about cats."))),
                            (client.completions.create, dict(prompt="Once upon a time"))):
        for limit in (5, 40):   # "length", and an end token reached ("stop")
            settings = dict(model="smol", max_tokens=limit, temperature=0, **request)
            whole = create(**settings)
            chunks = list(create(stream=True, stream_options={"include_usage": True}, **settings))
            assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage, (chunks[-1], whole.usage)
            assert all(chunk.usage is None for chunk in chunks[:-1])
            assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
            assert all(chunk.usage is None for chunk in create(stream=True, **settings))


def test_sigterm_lets_running_requests_finish_and_ends_the_others_with_an_error(smollm2_path: Path,
                                                                                 tmp_path: Path) -> None:
    """On SIGTERM the server's streams simply stopped after 0.5 s, without a finish_reason or an
    error (issue 22). Now a request that finishes within --shutdown-timeout gets its whole answer,
    a longer one ends with an error the client sees (a stream's error event, or a 503), and the
    server exits 0."""
    with serve(smollm2_path, tmp_path, *BUDGET, "--parallel", "3", "--shutdown-timeout", "4",
               "--model-alias", "smol") as server:
        client = server.client()
        endless = dict(model="smol", messages=chat("Tell me about cats."), max_tokens=100000, temperature=0,
                       logit_bias=NO_END)
        outcomes: Dict[str, Any] = {}
        streaming = threading.Event()

        def run(name: str, **kwargs: Any) -> None:
            try:
                if kwargs.get("stream"):
                    chunks = []
                    for chunk in client.chat.completions.create(**kwargs):
                        chunks.append(chunk)
                        streaming.set()
                    outcomes[name] = (len(chunks), chunks[-1].choices[0].finish_reason)
                else:
                    outcomes[name] = client.chat.completions.create(**kwargs).choices[0].finish_reason
            except openai.APIError as exc:
                outcomes[name] = exc

        clients = {"long stream": dict(endless, stream=True), "long answer": endless,
                   "short stream": dict(endless, max_tokens=24, stream=True)}
        threads = {name: threading.Thread(target=run, args=(name,), kwargs=kwargs) for name, kwargs in clients.items()}
        threads["long stream"].start()
        assert streaming.wait(TIMEOUT_S)
        threads["long answer"].start()
        threads["short stream"].start()
        wait_for(server, lambda stats: stats["requests_running"] == 3, "the three requests never ran together")
        server.stopped = True
        server.proc.send_signal(signal.SIGTERM)
        for thread in threads.values():
            thread.join(TIMEOUT_S)
        assert server.proc.wait(TIMEOUT_S) == 0, server.log.read_text()[-3000:]
    long_stream, long_answer = outcomes["long stream"], outcomes["long answer"]
    assert isinstance(long_stream, openai.APIError) and "shutting down" in long_stream.message, long_stream
    assert isinstance(long_answer, openai.APIStatusError) and long_answer.status_code == 503, long_answer
    assert long_answer.response.headers["Retry-After"] == "5"
    assert outcomes["short stream"][1] == "length", outcomes["short stream"]


def test_max_tokens_beyond_the_context_ends_at_the_context(server_short: Server) -> None:
    """max_tokens of 10**9 (or 0, or null: no limit) is cut to what the logical context has left:
    the answer fills the context and ends with finish_reason "length", in seconds."""
    prompt = {"prompt": "Hello.", "temperature": 0, "logit_bias": NO_END}
    answers = {}
    for max_tokens in (10**9, 10**40, 0, None):
        started = time.monotonic()
        status, answers[max_tokens] = _post(server_short, "/v1/completions", {**prompt, "max_tokens": max_tokens})
        assert status == 200, answers[max_tokens]
        usage = answers[max_tokens]["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == SHORT_CTX, (max_tokens, usage)
        assert answers[max_tokens]["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - started < TIMEOUT_S
    assert len({a["choices"][0]["text"] for a in answers.values()}) == 1  # the same answer each time

    # a stream, and a chat: the same end
    status, events = _post(server_short, "/v1/completions", {**prompt, "max_tokens": 10**9, "stream": True})
    assert status == 200 and _stream_text(events) == (answers[10**9]["choices"][0]["text"], "length")
    question = {"messages": chat("Why is the sky blue?"), "temperature": 0, "logit_bias": NO_END}
    status, reply = _post(server_short, "/v1/chat/completions", {**question, "max_tokens": 10**9})
    assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"] == SHORT_CTX
    status, events = _post(server_short, "/v1/chat/completions", {**question, "max_tokens": 10**9, "stream": True})
    assert status == 200 and _stream_text(events) == (reply["choices"][0]["message"]["content"], "length")

    # prompt + max_tokens beyond the context: the answer gets what the context has left
    long_prompt = {**prompt, "prompt": "Count with me: " + ", ".join(str(i) for i in range(1, 30)) + ","}
    status, answer = _post(server_short, "/v1/completions", {**long_prompt, "max_tokens": 100})
    assert status == 200, answer
    used = answer["usage"]
    assert SHORT_CTX - 100 < used["prompt_tokens"] < SHORT_CTX
    assert used["completion_tokens"] == SHORT_CTX - used["prompt_tokens"] < 100
    assert answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("Hi"), "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("Hi"), "max_completion_tokens": -5}, "max_completion_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1.5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("Hi"), "max_tokens": "many"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": chat("Hi"), "max_tokens": [8]}, "max_tokens"),
])
def test_a_max_tokens_that_is_no_count_is_a_400(server_short: Server, path: str, body: Dict[str, Any],
                                                 param: str) -> None:
    status, answer = _post(server_short, path, body)
    assert status == 400 and answer["error"]["param"] == param and param in answer["error"]["message"]
    assert server_short.get("/health") == {"status": "ok"}


def test_a_request_the_sampler_cannot_take_is_a_400_and_the_server_goes_on(server_short: Server) -> None:
    """Settings that once crashed the server (a grammar llama.cpp cannot parse: llama-cpp-python put
    its NULL sampler in the chain), were dropped silently (a logit_bias for no token) or were a 500
    (an empty prompt: nothing to sample from) are 400s naming the setting."""
    refused = [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "grammar": "root ::= ("}, "grammar"),
        ("/v1/chat/completions", {"messages": chat("Hi"), "max_tokens": 4, "grammar": "root ::= undefined"}, "grammar"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "grammar": 'start ::= "a"', "stream": True}, "grammar"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "logit_bias": {"999999999": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": chat("Hi"), "max_tokens": 4, "logit_bias": {"-3": 5}}, "logit_bias"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "logit_bias": {"abc": 5}}, "logit_bias"),
        ("/v1/completions", {"prompt": "", "max_tokens": 4}, None),
        ("/v1/completions", {"prompt": [], "max_tokens": 4, "stream": True}, None),
    ]
    for path, body, param in refused:
        status, answer = _post(server_short, path, body)
        assert status == 400, (body, answer)
        assert answer["error"]["param"] == param, (body, answer)
        assert (param or "the prompt is empty") in answer["error"]["message"], answer
        assert server_short.proc.poll() is None and server_short.get("/health") == {"status": "ok"}

    # the same settings, valid, do what they say
    status, answer = _post(server_short, "/v1/completions", {"prompt": "Is the sky blue? Answer:", "max_tokens": 4,
                                                             "temperature": 0, "grammar": 'root ::= " yes" | " no"'})
    assert status == 200 and answer["choices"][0]["text"] in (" yes", " no")
    status, answer = _post(server_short, "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 3, "temperature": 0,
                                                             "logit_bias": {"45": 100}})  # token 45: "="
    assert status == 200 and answer["choices"][0]["text"] == "==="


def test_a_burst_of_50_requests_gets_50_complete_answers(server_short: Server, smollm2_path: Path) -> None:
    """50 requests at once on 2 sequences (completions and chats, streamed or not): every one gets
    its whole answer, the one it gets alone, and the server is idle and healthy afterwards."""
    client = server_short.client()
    prompts = ["One, two,", "The capital of France is", "Roses are red,", "def add(a, b):", "Once upon a time"]
    settings = dict(max_tokens=8, temperature=0, logit_bias=NO_END)

    def kind(i: int) -> Tuple[str, bool, bool]:
        return prompts[i % len(prompts)], (i // 5) % 2 == 1, (i // 10) % 2 == 1

    def ask(i: int) -> Tuple[str, Optional[str]]:
        prompt, is_chat, stream = kind(i)
        if is_chat:
            if not stream:
                reply = client.chat.completions.create(model="smol", messages=chat(prompt), **settings)
                return reply.choices[0].message.content, reply.choices[0].finish_reason
            text, finish = "", None
            for chunk in client.chat.completions.create(model="smol", messages=chat(prompt), stream=True, **settings):
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            return text, finish
        if not stream:
            reply = client.completions.create(model="smol", prompt=prompt, **settings)
            return reply.choices[0].text, reply.choices[0].finish_reason
        text, finish = "", None
        for chunk in client.completions.create(model="smol", prompt=prompt, stream=True, **settings):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    alone = [ask(i) for i in range(10)]  # each prompt once as a completion and once as a chat
    assert all(text.strip() and finish == "length" for text, finish in alone), alone
    finished_before = server_short.get("/rkv/stats")["requests_finished"]

    started = time.monotonic()
    answers = _in_threads(ask, list(range(50)))
    took = time.monotonic() - started
    gaps = lone_gaps(smollm2_path, [(chat(prompt) if is_chat else prompt, settings)
                                    for prompt, is_chat, _ in map(kind, range(10))])
    for i, answer in enumerate(answers):
        assert not isinstance(answer, BaseException), (i, answer)
        assert_same_unless_a_near_tie(alone[i % 10], gaps[i % 10], answer, f"request {i}")

    stats = server_short.get("/rkv/stats")
    assert stats["requests_finished"] - finished_before == 50
    assert (stats["requests_running"], stats["requests_waiting"], stats["context"]["cells_used"]) == (0, 0, 0)
    assert server_short.get("/health") == {"status": "ok"}
    print(f"50 requests on 2 sequences in {took:.1f} s")


def test_more_requests_than_sequences_wait_their_turn(smollm2_path: Path, tmp_path: Path) -> None:
    with serve(smollm2_path, tmp_path, *BUDGET, "--parallel", "2") as server:
        client = server.client()
        replies = _in_threads(lambda q: client.chat.completions.create(
            model="any", messages=chat(q), max_tokens=16, temperature=0), QUESTIONS)
        for reply in replies:
            assert not isinstance(reply, BaseException), reply
            assert reply.choices[0].message.content.strip()
            assert reply.choices[0].finish_reason in ("stop", "length")
        # counted by the server as they happened, not sampled by a poller
        stats = server.get("/rkv/stats")
        assert stats["scheduler"]["max_sequences"] == 2, stats["scheduler"]
        assert stats["requests_waited"] > 0
        assert stats["requests_finished"] == len(QUESTIONS)


def test_a_prompt_beyond_the_context_is_a_400_while_others_go_on(smollm2_path: Path, tmp_path: Path) -> None:
    with serve(smollm2_path, tmp_path, *BUDGET, "--parallel", "2", "--n-ctx", "64") as server:
        client = server.client()
        normal: Dict[str, Any] = {}
        worker = threading.Thread(target=lambda: normal.update(_stream_chat(client, chat("What is 2+2?"), 24)))
        worker.start()
        too_long = chat("Please repeat: " + "apple banana cherry " * 30)
        try:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="smol", messages=too_long, max_tokens=8)
            assert info.value.code == "context_length_exceeded" and "64" in info.value.message
            with pytest.raises(openai.BadRequestError):  # a stream too: refused before it starts
                client.chat.completions.create(model="smol", messages=too_long, max_tokens=8, stream=True)
        finally:
            worker.join(TIMEOUT_S)
        assert normal["text"].strip() and normal["finish"] in ("stop", "length")
        reply = client.completions.create(model="smol", prompt="One, two,", max_tokens=8, temperature=0)
        assert reply.choices[0].text


def test_a_client_that_disconnects_frees_its_sequence(smollm2_path: Path, tmp_path: Path) -> None:
    with serve(smollm2_path, tmp_path, *BUDGET, "--parallel", "1", "--api-key", "secret") as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        client = server.client(api_key="secret")
        stream = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5, 6,", max_tokens=4000,
                                           temperature=0, stream=True, logit_bias=NO_END)
        pieces = 0
        for chunk in stream:
            assert chunk.choices[0].finish_reason is None
            pieces += 1
            if pieces == 5:
                break
        # meanwhile a second request waits for the only sequence, and its client gives up
        with pytest.raises(openai.APITimeoutError):
            server.client(api_key="secret", timeout=1.0).chat.completions.create(
                model="smol", messages=chat("What is 2+2?"), max_tokens=16)
        assert server.get("/rkv/stats", api_key="secret")["requests_running"] == 1
        wait_for(server, lambda stats: stats["requests_cancelled"] == 1, "the server never noticed the client left",
                 api_key="secret")
        stream.close()
        closed = time.monotonic()

        deadline = closed + 30
        while True:
            stats = server.get("/rkv/stats", api_key="secret")
            if (stats["requests_running"], stats["requests_waiting"], stats["context"]["cells_used"]) == (0, 0, 0):
                break
            assert time.monotonic() < deadline, f"the sequence was never freed: {stats}"
            time.sleep(0.1)
        # the abandoned request stopped long before its 4000 tokens; the one whose client left
        # while it waited never ran
        assert stats["requests_finished"] == 1 and stats["last_finished"]["n_tokens"] < 1000
        assert not any(s["busy"] for s in stats["sequences"])

        # the only sequence serves the next request
        reply = client.chat.completions.create(model="smol", messages=chat("What is 2+2?"), max_tokens=16,
                                               temperature=0)
        assert reply.choices[0].message.content.strip()


def _metrics(server: Server) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """``GET /metrics`` read with prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.base + "/metrics", timeout=10) as response:
        assert response.headers.get_content_type() == "text/plain"
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_max_queue_refuses_with_503_and_metrics_show_queue_cells_and_tokens(smollm2_path: Path,
                                                                            tmp_path: Path) -> None:
    with serve(smollm2_path, tmp_path, *BUDGET, "--parallel", "1", "--max-queue", "1") as server:
        client = server.client()
        # a stream holds the only sequence (and compresses: 32 + 16 cells), a second request waits
        stream = client.completions.create(model="smol", prompt="1, 2, 3, 4, 5, 6,", max_tokens=4000,
                                           temperature=0, stream=True, logit_bias=NO_END)
        chunks = iter(stream)
        for _ in range(80):
            next(chunks)
        waiting: Dict[str, Any] = {}
        worker = threading.Thread(target=lambda: waiting.update(reply=client.chat.completions.create(
            model="smol", messages=chat("What is 2+2?"), max_tokens=8, temperature=0)))
        worker.start()
        deadline = time.monotonic() + 30
        while server.get("/rkv/stats")["requests_waiting"] != 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.1)

        with pytest.raises(openai.InternalServerError) as info:   # a third is one too many
            client.completions.create(model="smol", prompt="Hi", max_tokens=4)
        assert info.value.status_code == 503 and info.value.code == "queue_full"
        assert info.value.response.headers["Retry-After"] == "5"

        metrics = _metrics(server)
        assert metrics["rkv_requests_running", ()] == 1 and metrics["rkv_requests_waiting", ()] == 1
        assert metrics["rkv_requests_rejected_total", (("reason", "queue_full"),)] == 1
        assert metrics["rkv_requests_total", (("endpoint", "create_completion"),)] == 2
        assert metrics["rkv_requests_total", (("endpoint", "create_chat_completion"),)] == 1
        assert 0 < metrics["rkv_sequence_cells", (("seq_id", "0"),)] <= 32 + 16
        assert metrics["rkv_sequence_compressions", (("seq_id", "0"),)] >= 1
        assert metrics["rkv_sequence_tokens", (("seq_id", "0"),)] > 80
        assert metrics["rkv_sequence_kv_bytes", (("seq_id", "0"),)] > 0

        stream.close()       # the waiting request gets the sequence
        worker.join(TIMEOUT_S)
        assert waiting["reply"].choices[0].message.content
        deadline = time.monotonic() + 30
        while _metrics(server)["rkv_requests_finished_total", ()] != 2:
            assert time.monotonic() < deadline, "the requests never finished"
            time.sleep(0.1)

        # the token counters move by what a request reports as its usage
        before = _metrics(server)
        reply = client.completions.create(model="smol", prompt="One, two,", max_tokens=12, temperature=0,
                                          logit_bias=NO_END)
        after = _metrics(server)
        assert after["rkv_prompt_tokens_total", ()] - before["rkv_prompt_tokens_total", ()] == reply.usage.prompt_tokens
        assert (after["rkv_completion_tokens_total", ()] - before["rkv_completion_tokens_total", ()]
                == reply.usage.completion_tokens == 12)
        assert after["rkv_completion_tokens_per_second", ()] > 0
        assert after["rkv_requests_running", ()] == 0 and after["rkv_sequence_cells", (("seq_id", "0"),)] == 0


# ---------------------------------------------------------------------------------------------
# failures inside a stream, with a stand-in for the model (the app runs in this process)
# ---------------------------------------------------------------------------------------------


class _FailingView:
    """A sequence view whose completion streams two pieces and then breaks (or just stops)."""

    seq_id = 0
    cancelled = False

    def __init__(self, ending: str) -> None:
        self.ending = ending

    def create_completion(self, **kwargs: Any) -> Iterator[Dict[str, Any]]:
        for text in ("Hello", " world"):
            yield {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": kwargs["model"],
                   "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}
        if self.ending == "error":
            raise RuntimeError("the decoder broke")

    def kv_stats(self) -> Any:
        raise RuntimeError("no figures")


class _FailingModel:
    n_seq_max = 1

    def __init__(self, ending: str) -> None:
        self.ending = ending

    @contextmanager
    def sequence(self) -> Iterator[_FailingView]:
        yield _FailingView(self.ending)


@contextmanager
def serve_in_process(app: Any) -> Iterator[str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("ending", ["error", "no finish_reason"])
def test_a_stream_that_breaks_after_it_started_ends_with_an_error_event(ending: str) -> None:
    from rkv_local import server

    app = server.create_app(_FailingModel(ending), model_alias="stub")
    with serve_in_process(app) as base:
        request = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": "Hi", "stream": True}).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
            events = response.read().decode().replace("\r\n", "\n").strip().split("\n\n")
        assert [e for e in events if e.startswith("data: {\"id\"")][-1].count("world") == 1
        assert events[-2].startswith("event: error\ndata: ") and "\"error\"" in events[-2]
        assert events[-1] == "data: [DONE]"

        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)
        pieces = []
        with pytest.raises(openai.APIError, match="the decoder broke" if ending == "error" else "finish_reason"):
            for chunk in client.completions.create(model="stub", prompt="Hi", stream=True):
                pieces.append(chunk.choices[0].text)
        assert pieces == ["Hello", " world"]
