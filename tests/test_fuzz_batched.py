"""Random requests to ``BatchedLlama`` from several threads, checked against what each gets alone
(issue 21).

Each step is one request: a completion, a chat or a function-calling chat; streamed or not, read to
its end or left after a few chunks; greedy, seeded or unseeded; with its own ``max_tokens``, stop
strings, ``top_k``, ``repeat_penalty`` and ``logit_bias``. Some steps instead run two requests
through ``stream_batch`` and leave its loop early. Requests run in rounds of one ``BatchedLlama``
(more requests than sequences, so some wait for one); in some rounds ``close()`` comes at a random
moment while requests are in flight.

Invariants: every request ends before a deadline, with its text and a ``finish_reason``, or (after
``close()``) the "closed" error, and nothing else; a greedy request gives exactly what the same
request gives alone (``Llama`` with the same settings, one token per decode call), unless the lone
run met a near tie of its two best logits (batching rounds logits differently, by up to 1e-3 here:
tests/near_tie.py, in its variant for outcomes not split into steps);
every sequence holds at most B + b cells; after a round every sequence is free and empty, and
nothing waits in the scheduler; a closed round frees the model once its requests are gone.

`make test` runs 1,000 steps; a long run: ``pytest tests/test_fuzz_batched.py --fuzz-steps 10000``
(``--fuzz-seed`` changes the seed). A failure names its seed, round and request.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from rkv_local import BatchedLlama, Llama
from rkv_local.evals.decoding import eog_tokens

from near_tie import assert_same_unless_a_near_tie, recorded

B, b = 32, 16
N_SEQ = 3
WORKERS = 4          # one more than the sequences: requests wait for a free one
ROUND = 40           # requests per BatchedLlama
DEADLINE_S = 120.0
# one token per decode call and per ubatch, alone and batched: the same computation for each token.
# n_ctx: chatml-function-calling writes its tool calls without max_tokens, to the end of the context
# (a random model never closes the JSON), at a grammar's cost per token (~0.1 s here): a context of
# the tools' prompt (about 540 tokens) and a little more, tools rare and with the shortest question.
# What fills that context then is a clear error of the request, as with Llama.
SETTINGS = dict(kv_budget=B, kv_buffer=b, n_ctx=560, n_batch=1, n_ubatch=1, n_threads=1, flash_attn=True, verbose=False,
                chat_format="chatml-function-calling")
PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3, 4,",
           "Write a long story about a cat who lives in a lighthouse by the sea. " * 4,   # compressed on the way
           "Why is the sky blue?"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@dataclass
class Request:
    kind: str                       # completion, chat, tools
    prompt: str
    settings: Dict[str, Any]
    stream: bool = False
    read: Optional[int] = None      # a stream left after this many chunks

    @property
    def greedy(self) -> bool:
        return self.settings["temperature"] == 0.0

    def run(self, llm: Any, **extra: Any) -> Any:
        """The request's outcome, in a form equal for equal answers (ids and times left out)."""
        settings = dict(self.settings, **extra)
        if self.kind == "completion":
            out = llm.create_completion(self.prompt, stream=self.stream, **settings)
        else:
            tools = dict(tools=TOOLS, tool_choice="auto") if self.kind == "tools" else {}
            out = llm.create_chat_completion([{"role": "user", "content": self.prompt}], stream=self.stream,
                                             **tools, **settings)
        if not self.stream:
            choice = out["choices"][0]
            text = choice.get("text", choice.get("message", {}).get("content"))
            calls = [{k: v for k, v in call.items() if k != "id"}   # named after the completion's id
                     for call in choice.get("message", {}).get("tool_calls") or []]
            tools = json.dumps(calls, sort_keys=True)
            return [(text, tools, choice["finish_reason"])]
        chunks = []
        try:
            for chunk in out:
                choice = chunk["choices"][0]
                chunks.append((choice.get("text", choice.get("delta", {}).get("content")), choice["finish_reason"]))
                if self.read is not None and len(chunks) == self.read:
                    break
        finally:
            out.close()
        return chunks


def draw_request(rng: np.random.Generator, eog: List[int]) -> Request:
    kind = "tools" if rng.random() < 0.005 else str(rng.choice(["completion", "completion", "chat"]))
    temperature = float(rng.choice([0.0, 0.0, 0.8]))
    settings: Dict[str, Any] = dict(max_tokens=int(rng.integers(1, 16 if kind == "tools" else 24)),
                                    temperature=temperature)
    if temperature > 0 and rng.random() < 0.6:
        settings["seed"] = int(rng.integers(0, 2**31))
    if rng.random() < 0.3:
        settings["stop"] = [str(rng.choice(["\n", ".", " the", "ing"]))]
    if rng.random() < 0.3:
        settings.update(top_k=int(rng.choice([1, 5, 40])), repeat_penalty=float(rng.choice([1.0, 1.3])))
    if rng.random() < 0.3:
        settings["logit_bias"] = {int(t): -100.0 for t in eog}
    stream = kind != "tools" and rng.random() < 0.5
    read = int(rng.integers(1, 4)) if stream and rng.random() < 0.3 else None
    return Request(kind, PROMPTS[0] if kind == "tools" else str(rng.choice(PROMPTS)), settings, stream, read)


@dataclass
class Lone:
    """What each greedy request gives alone, computed once per request, and the gaps between the two
    best logits on the way (of every completion it made: a tool call completes twice)."""

    llm: Llama
    answers: Dict[str, Tuple[Any, List[float]]] = field(default_factory=dict)

    def answer(self, request: Request) -> Tuple[Any, List[float]]:
        key = json.dumps([request.kind, request.prompt, request.settings, request.stream], sort_keys=True)
        if key not in self.answers:
            recorder, settings = recorded(request.settings)   # the gaps after its logit_bias and penalty
            self.llm.reset()   # a fresh cache, as a request's sequence is
            whole = Request(request.kind, request.prompt, request.settings, request.stream)
            try:
                answer = whole.run(self.llm, logits_processor=settings["logits_processor"])
            except ValueError as exc:
                answer = [("error", context_full(exc))]
            self.answers[key] = (answer, recorder.gaps)
        answer, gaps = self.answers[key]
        return (answer[:request.read] if request.read is not None else answer), gaps


def context_full(exc: ValueError) -> str:
    """A tool call that filled the context: llama-cpp-python's error, the same alone and batched."""
    assert "exceed the context window" in str(exc), exc
    return "context full"


def check_outcome(request: Request, outcome: Any, lone: Lone, closed: bool, label: str) -> str:
    if isinstance(outcome, ValueError) and request.kind == "tools":
        outcome = [("error", context_full(outcome))]
    if isinstance(outcome, BaseException):
        assert closed and isinstance(outcome, RuntimeError) and "closed" in str(outcome), \
            f"{label}: {request} failed: {outcome!r}"
        return "closed"
    finish = outcome[-1][-1]
    if request.read is None:
        assert finish in ("stop", "length", "tool_calls", "context full"), f"{label}: {request} ended with {outcome[-1]}"
    if request.greedy:
        alone, gaps = lone.answer(request)
        # batching rounds a token's logits differently (measured: up to 1e-3 on this model), so a near
        # tie may go the other way; chunks are not steps: any near tie of the lone run excuses a difference
        if assert_same_unless_a_near_tie(alone, gaps, outcome, f"{label}: {request}"):
            return "near tie"
    if outcome[-1][-1] == "context full":
        return "context full"
    return "left early" if request.read is not None else "answered"


def check_sequences(batch: BatchedLlama, label: str) -> None:
    for seq in range(N_SEQ):
        stats = batch.kv_stats(seq)
        assert stats.cells_peak <= B + b and stats.cells_used <= B + b, f"{label}: sequence {seq}: {stats}"


def run_stream_batch(batch: BatchedLlama, rng: np.random.Generator) -> str:
    """Two requests through stream_batch, the loop left after a few chunks: both are cancelled."""
    stream = batch.stream_batch(["Once upon a time", PROMPTS[3]], max_tokens=200, temperature=0.0)
    outcome = "stream_batch left"
    try:
        for _, (index, item) in zip(range(int(rng.integers(1, 6))), stream):
            assert index in (0, 1)
            if isinstance(item, Exception):
                assert isinstance(item, RuntimeError) and "closed" in str(item), item
                outcome = "closed"
    finally:
        stream.close()
    return outcome


def run_round(path: str, rng: np.random.Generator, lone: Lone, eog: List[int], steps: int, label: str) -> Dict[str, int]:
    requests: List[Any] = [draw_request(rng, eog) if rng.random() > 0.05 else "stream_batch" for _ in range(steps)]
    for request in requests:   # answers alone first: the round's timing is the batch's own
        if isinstance(request, Request) and request.greedy:
            lone.answer(request)
    close_at = int(rng.integers(0, steps)) if rng.random() < 0.3 else None
    seeds = [int(rng.integers(2**31)) for _ in requests]   # drawn here: the clients run in any order
    batch = BatchedLlama(path, n_seq_max=N_SEQ, **SETTINGS)
    done: Dict[str, int] = {}
    closed = False

    def one(request: Any) -> Tuple[Any, Any]:
        try:
            if request == "stream_batch":
                return request, run_stream_batch(batch, np.random.default_rng(seeds.pop()))
            return request, request.run(batch)
        except Exception as exc:  # noqa: BLE001 - checked by the caller
            return request, exc

    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="fuzz-client") as pool:
            futures = [pool.submit(one, request) for request in requests]
            for i, future in enumerate(futures):
                if i == close_at:
                    batch.close()
                    closed = True
                try:
                    request, outcome = future.result(timeout=DEADLINE_S)
                except FutureTimeout:
                    raise AssertionError(f"{label}: request {i} ({requests[i]}) still running after {DEADLINE_S} s")
                where = f"{label}, request {i}"
                if request == "stream_batch":
                    if isinstance(outcome, BaseException):
                        raise AssertionError(f"{where}: stream_batch failed: {outcome!r}") from outcome
                    kind = outcome
                    assert closed or kind != "closed", f"{where}: stream_batch failed: closed"
                else:
                    kind = check_outcome(request, outcome, lone, closed, where)
                done[kind] = done.get(kind, 0) + 1
                if not closed:
                    check_sequences(batch, where)
        if not closed:
            assert sorted(batch._free) == list(range(N_SEQ)), f"{label}: sequences left occupied: {batch._free}"
            assert not batch._scheduler._pending and not batch._scheduler._active, label
            assert batch.kv_stats().cells_used == 0, label
        else:
            assert batch._model_freed, f"{label}: closed, every request gone, the model still loaded"
    finally:
        batch.close()
    return done


def test_fuzz_batched_requests(request, tiny_model) -> None:
    path = str(tiny_model(arch="llama"))
    seed = request.config.getoption("--fuzz-seed") + 200
    steps = request.config.getoption("--fuzz-steps") or 1000
    rng = np.random.default_rng(seed)
    lone_llm = Llama(path, **SETTINGS)
    try:
        eog = [int(t) for t in eog_tokens(lone_llm)]
        lone = Lone(lone_llm)
        done: Dict[str, int] = {}
        for r, start in enumerate(range(0, steps, ROUND)):
            n = min(ROUND, steps - start)
            for kind, count in run_round(path, rng, lone, eog, n, f"seed {seed}, round {r}").items():
                done[kind] = done.get(kind, 0) + count
    finally:
        lone_llm.close()
    print(f"batched fuzz: {steps} steps {done}")
    assert sum(done.values()) == steps
