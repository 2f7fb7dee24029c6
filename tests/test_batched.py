"""``BatchedLlama``: many requests in one context, each in its own KV stream with its own budget.

The rule the tests hold: a request gives the same greedy text whether it runs alone (``Llama``)
or decoded together with others, with and without a budget, streamed or not; but for a near tie of
its lone run, which a batch's rounding may tip the other way (tests/near_tie.py).
"""
from __future__ import annotations

import gc
import signal
import time
from contextlib import closing
import threading
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest

from rkv_local import BatchedLlama, Llama, llama_cpp
from rkv_local.evals.decoding import eog_tokens
from rkv_local.testing import make_tiny_lora

from near_tie import GapRecorder, assert_same_completion, recorded

QUESTIONS = ["Why is the sky blue?", "What is 2+2?", "Name three fruits.", "Tell me about cats.",
             "What is the capital of France?", "Explain gravity.", "How do birds fly?", "Write a haiku."]
CHATS = [[{"role": "user", "content": q}] for q in QUESTIONS]
BUDGET = dict(kv_budget=32, kv_buffer=16)
GREEDY = dict(max_tokens=48, temperature=0.0)


def chat_text(response: Dict[str, Any]) -> str:
    return response["choices"][0]["message"]["content"]


Recorded = Tuple[GapRecorder, str]   # a request's text and what its greedy choices were made from


def alone(model: Path, chats: List[List[Dict[str, str]]], **kwargs: Any) -> List[Recorded]:
    llm = Llama(model, n_threads=2, flash_attn=True, verbose=False, **kwargs)
    try:
        runs = []
        for chat in chats:
            recorder, settings = recorded(GREEDY)
            runs.append((recorder, chat_text(llm.create_chat_completion(chat, **settings))))
        return runs
    finally:
        llm.close()


def recorded_requests(n: int, settings: Dict[str, Any] = GREEDY) -> Tuple[List[GapRecorder], List[Dict[str, Any]]]:
    """Per-request settings of n greedy requests of a batch, each with its own GapRecorder."""
    pairs = [recorded(settings) for _ in range(n)]
    return [r for r, _ in pairs], [s for _, s in pairs]


def assert_each_as_alone(expected: List[Recorded], recorders: List[GapRecorder], texts: List[str]) -> List[int]:
    """Each request's text is its text alone, or parts from it at a near tie (a batch rounds
    logits differently from a lone decode: tests/near_tie.py); the requests that parted."""
    assert len(texts) == len(expected)
    return [i for i, ((lone, text_alone), recorder, text) in enumerate(zip(expected, recorders, texts))
            if assert_same_completion(lone, text_alone, recorder, text, f"request {i}") is not None]


@pytest.fixture(scope="module")
def alone_with_budget(smollm2_path: Path) -> List[Recorded]:
    return alone(smollm2_path, CHATS, **BUDGET)


def test_a_batch_of_8_gives_each_request_its_text_alone(smollm2_path: Path,
                                                          alone_with_budget: List[Recorded]) -> None:
    recorders, settings = recorded_requests(len(CHATS))
    with BatchedLlama(smollm2_path, n_seq_max=8, n_threads=2, **BUDGET) as batch:
        results = batch.generate_batch(CHATS, settings=settings)
    assert_each_as_alone(alone_with_budget, recorders, [chat_text(r) for r in results])
    assert all(r["object"] == "chat.completion" and r["usage"]["completion_tokens"] > 0 for r in results)
    # prompt and answer exceed budget + buffer: most sequences were compressed on their way
    assert sum(r["usage"]["total_tokens"] > 32 + 16 for r in results) >= 6


def test_8_sequences_of_a_tiny_model_equal_alone(tiny_model) -> None:
    """The same check on a random model (the GPU check's, where SmolLM2 is not at hand): token
    prompts, 80 greedy tokens each, past budget + buffer. Its near ties are common (a top-2 gap of
    1e-4 seen), and a batch rounds differently: a sequence may part from its lone twin at one."""
    path = tiny_model(arch="qwen2", n_head=4, n_head_kv=2)
    prompts = [[int(t) for t in np.random.default_rng(i).integers(100, 20000, 12)] for i in range(8)]
    settings = dict(max_tokens=80, temperature=0.0, logit_bias={t: float("-inf") for t in (0, 1, 2)})
    llm = Llama(path, n_threads=2, flash_attn=True, verbose=False, **BUDGET)
    alone = []
    try:
        for p in prompts:
            recorder, recorded_settings = recorded(settings)
            alone.append((recorder, llm.create_completion(p, **recorded_settings)["choices"][0]["text"]))
    finally:
        llm.close()
    recorders, batched_settings = recorded_requests(len(prompts), settings)
    with BatchedLlama(path, n_seq_max=8, n_threads=2, **BUDGET) as batch:
        results = batch.generate_batch(prompts, settings=batched_settings)
        assert batch.step_stats().max_sequences == 8
    assert not any(isinstance(r, Exception) for r in results), results
    parted = assert_each_as_alone(alone, recorders, [r["choices"][0]["text"] for r in results])
    # each parting is at a near tie; most sequences must still be compared whole
    assert len(parted) <= len(prompts) // 2, f"sequences {parted} parted from their lone runs at near ties"


def test_full_caches_in_a_batch_equal_alone(smollm2_path: Path) -> None:
    expected = alone(smollm2_path, CHATS[:4], n_ctx=512)
    recorders, settings = recorded_requests(4)
    with BatchedLlama(smollm2_path, n_seq_max=4, n_ctx=512, n_threads=2) as batch:
        assert batch.kv_config is None
        texts = [chat_text(r) for r in batch.generate_batch(CHATS[:4], settings=settings)]
    assert_each_as_alone(expected, recorders, texts)


def test_streams_come_piece_by_piece_and_each_ends_with_a_finish_reason(
        smollm2_path: Path, alone_with_budget: List[Recorded]) -> None:
    pieces: Dict[int, List[str]] = {i: [] for i in range(4)}
    finish: Dict[int, Any] = {}
    recorders, settings = recorded_requests(4)
    with BatchedLlama(smollm2_path, n_seq_max=4, n_threads=2, **BUDGET) as batch:
        for i, chunk in batch.stream_batch(CHATS[:4], stream=True, settings=settings):
            assert not isinstance(chunk, Exception), chunk
            choice = chunk["choices"][0]
            pieces[i].append(choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                finish[i] = choice["finish_reason"]
    assert_each_as_alone(alone_with_budget[:4], recorders, ["".join(pieces[i]) for i in range(4)])
    assert all(len(p) > 3 for p in pieces.values())
    assert sorted(finish) == [0, 1, 2, 3] and set(finish.values()) <= {"stop", "length"}


def test_more_requests_than_sequences_wait_for_a_free_one(
        smollm2_path: Path, alone_with_budget: List[Recorded]) -> None:
    recorders, settings = recorded_requests(5)
    with BatchedLlama(smollm2_path, n_seq_max=2, n_threads=2, **BUDGET) as batch:
        results = batch.generate_batch(CHATS[:5], settings=settings)
        stats = batch.kv_stats()
    assert_each_as_alone(alone_with_budget[:5], recorders, [chat_text(r) for r in results])
    # every finished request gave its stream back, emptied
    assert stats.cells_used == 0 and stats.cells_max == 2 * 256


def test_a_prompt_past_the_logical_context_fails_alone(smollm2_path: Path) -> None:
    long_prompt = "tell me more " * 60
    with BatchedLlama(smollm2_path, n_seq_max=2, n_ctx=96, n_threads=2, **BUDGET) as batch:
        short, failed = batch.generate_batch(["The capital of France is", long_prompt], max_tokens=8, temperature=0.0)
    assert isinstance(failed, ValueError) and "96" in str(failed)
    assert short["choices"][0]["text"] and short["choices"][0]["finish_reason"] == "length"


def test_per_request_settings_and_a_seeded_sample_reproduce(smollm2_path: Path) -> None:
    prompts = ["Once upon a time"] * 3
    batched, greedy_settings = recorded(dict(temperature=0.0))
    settings = [dict(temperature=0.9, seed=7), dict(temperature=0.9, seed=7), greedy_settings]
    with BatchedLlama(smollm2_path, n_seq_max=3, n_threads=2, **BUDGET) as batch:
        a, b, greedy = batch.generate_batch(prompts, max_tokens=24, settings=settings)
    # the same seed in the same decode calls: the same samples
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    single = Llama(smollm2_path, n_threads=2, flash_attn=True, verbose=False, **BUDGET)
    try:
        lone, lone_settings = recorded(dict(max_tokens=24, temperature=0.0))
        expected = single.create_completion(prompts[0], **lone_settings)["choices"][0]["text"]
    finally:
        single.close()
    assert_same_completion(lone, expected, batched, greedy["choices"][0]["text"])


def test_a_reader_that_stops_early_frees_its_sequence(smollm2_path: Path) -> None:
    with BatchedLlama(smollm2_path, n_seq_max=1, n_threads=2, **BUDGET) as batch:
        stream = batch.create_completion("Once upon a time", max_tokens=200, temperature=0.0, stream=True)
        for _ in zip(range(3), stream):
            pass
        stream.close()
        done = threading.Event()
        result: Dict[str, Any] = {}

        def second() -> None:
            result.update(batch.create_completion("The capital of France is", max_tokens=4, temperature=0.0))
            done.set()

        threading.Thread(target=second, daemon=True).start()
        assert done.wait(60), "the sequence of the abandoned stream was not freed"
        assert result["choices"][0]["finish_reason"] == "length"


def test_kv_stats_per_sequence_and_for_the_context(smollm2_path: Path) -> None:
    with BatchedLlama(smollm2_path, n_seq_max=2, n_threads=2, **BUDGET) as batch:
        with batch.sequence() as first, batch.sequence() as second:
            first.create_completion("Once upon a time " * 20, max_tokens=40, temperature=0.0)
            second.create_completion("Hello", max_tokens=4, temperature=0.0)
            one, two, total = first.kv_stats(), second.kv_stats(), batch.kv_stats()
    assert (one.method, one.budget, one.buffer, one.cells_max) == ("rkv", 32, 16, 48)
    assert one.compressions > 0 and one.cells_used <= 48 and one.n_tokens > 48
    assert two.compressions == 0 and 0 < two.cells_used < 16
    assert total.cells_used == one.cells_used + two.cells_used
    assert total.compressions == one.compressions and total.cells_max == 2 * 256


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_seq_max=0), "n_seq_max"),
    (dict(n_seq_max=10**6), "n_seq_max"),
    (dict(n_seq_max=2, kv_budget=8, kv_window=8), "kv_budget"),
    (dict(n_seq_max=2, logits_all=True), "logits_all"),
])
def test_bad_settings_are_refused(tiny_model, kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchedLlama(tiny_model(arch="llama"), verbose=False, **kwargs)


def test_a_context_too_large_to_allocate_is_a_clear_error(tiny_model) -> None:
    with pytest.raises(ValueError, match="cannot create a context of 64 sequences"):
        BatchedLlama(tiny_model(arch="llama", n_ctx_train=1 << 20), n_seq_max=64, n_ctx=1 << 24, verbose=False)


def test_a_closed_batch_refuses_requests(tiny_model) -> None:
    batch = BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, verbose=False)
    batch.close()
    with pytest.raises(RuntimeError, match="closed"):
        batch.create_completion("hello", max_tokens=2)


def endless(batch: BatchedLlama, started: Optional[threading.Event] = None) -> Dict[str, Any]:
    """Settings of a request that runs until it is stopped: end tokens banned, ``started`` set at its
    first sampled token."""
    eog = eog_tokens(batch._proto)

    def ban(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if started is not None:
            started.set()
        scores[eog] = -np.inf
        return scores

    return dict(max_tokens=10**6, temperature=0.0, logits_processor=llama_cpp.LogitsProcessorList([ban]))


def test_closing_with_requests_in_flight_fails_them_and_frees_the_model_after_the_last(tiny_model) -> None:
    """close() freed the model under requests still running: the next to tokenize died of SIGSEGV
    (issue 21, item 4). Now running requests fail at their next decode, waiting ones at once, and
    the model is freed when the last request leaves its sequence, here a stream left unread."""
    batch = BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, verbose=False)
    stream = batch.create_completion("Hello", stream=True, **endless(batch))
    first = next(stream)                                    # holds sequence 0, suspended
    started, errors = threading.Event(), {}

    def run(name: str, **settings: Any) -> None:
        try:
            batch.create_completion("World", **settings)
        except Exception as exc:  # noqa: BLE001 - what the test reads
            errors[name] = exc

    running = threading.Thread(target=run, args=("running",), kwargs=endless(batch, started))
    running.start()
    assert started.wait(60)                                 # sequence 1 decoding
    waiting = threading.Thread(target=run, args=("waiting",), kwargs=dict(max_tokens=4))
    waiting.start()                                         # no free sequence: it waits
    batch.close()
    running.join(60)
    waiting.join(60)
    assert not running.is_alive() and not waiting.is_alive()
    assert {name: str(exc) for name, exc in errors.items()} == {
        "running": "this BatchedLlama is closed", "waiting": "this BatchedLlama is closed"}
    assert first["choices"][0]["finish_reason"] is None and not batch._model_freed   # the stream still holds it
    assert batch._proto.tokenize(b"still loaded")
    with pytest.raises(RuntimeError, match="closed"):
        list(stream)
    assert batch._model_freed
    with pytest.raises(RuntimeError, match="closed"):
        batch.kv_stats()


def test_closing_under_many_requests_ends_each_with_its_text_or_an_error(tiny_model) -> None:
    """Requests tokenizing, decoding, sampling and leaving while close() runs: each ends with a result
    or "closed", and the process lives on."""
    batch = BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, verbose=False)
    outcomes: List[str] = []
    started = threading.Event()

    def client() -> None:
        for _ in range(200):
            try:
                batch.create_completion("Hello there", max_tokens=3, temperature=0.0)
                outcomes.append("text")
            except RuntimeError as exc:
                assert "closed" in str(exc)
                outcomes.append("closed")
                return
            started.set()

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    assert started.wait(60)
    batch.close()
    for c in clients:
        c.join(60)
    assert outcomes.count("closed") == 4 and "text" in outcomes and batch._model_freed


def test_lora_n_batch_and_n_ubatch_reach_the_batched_context(tiny_model, tmp_path: Path) -> None:
    """They were dropped (issue 21, item 6): a LoRA adapter never applied (the server answered with the
    base model), the chunking settings replaced by the batch's."""
    model = tiny_model(arch="llama")
    adapter = make_tiny_lora(tmp_path / "adapter.gguf")
    greedy = dict(max_tokens=12, temperature=0.0)

    def lone(llm: Llama, prompt: str) -> Recorded:
        recorder, settings = recorded(greedy)
        return recorder, llm.create_completion(prompt, **settings)["choices"][0]["text"]

    with closing(Llama(str(model), n_ctx=256, verbose=False, lora_path=str(adapter))) as llm:
        adapted = lone(llm, "Hello world")
    with closing(Llama(str(model), n_ctx=256, verbose=False)) as llm:
        base = lone(llm, "Hello world")
    assert adapted[1] != base[1]   # the adapter changes the text
    # a batch of two against a lone decode: the rule of tests/near_tie.py
    recorders, settings = recorded_requests(2, greedy)
    with BatchedLlama(model, n_seq_max=2, lora_path=str(adapter), verbose=False) as batch:
        texts = [r["choices"][0]["text"] for r in batch.generate_batch(["Hello world"] * 2, settings=settings)]
    assert_each_as_alone([adapted] * 2, recorders, texts)
    long_prompt = "Hello world " * 40
    recorders, settings = recorded_requests(2, greedy)
    with BatchedLlama(model, n_seq_max=2, n_batch=8, n_ubatch=4, verbose=False, **BUDGET) as batch:
        assert batch.chunk_size == 8
        assert llama_cpp.llama_n_ubatch(batch._ctx.ctx) == 4
        texts = [r["choices"][0]["text"] for r in batch.generate_batch([long_prompt] * 2, settings=settings)]
    with closing(Llama(str(model), verbose=False, **BUDGET)) as llm:
        assert_each_as_alone([lone(llm, long_prompt)] * 2, recorders, texts)


def test_an_interrupted_request_withdraws_its_tokens(tiny_model) -> None:
    """A KeyboardInterrupt while a request waited for its decode left its tokens queued: the scheduler
    decoded them later, into a sequence the request had given back (issue 21, item 9)."""
    with BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, verbose=False) as batch:
        scheduler = batch._scheduler
        with batch.sequence() as first, batch.sequence() as second:
            with scheduler.ctx_lock:   # the scheduler's next decode waits for it
                decoding = threading.Thread(target=scheduler.submit, args=(first, [1, 2], False))
                decoding.start()
                deadline = time.monotonic() + 10
                while scheduler._pending and time.monotonic() < deadline:
                    time.sleep(0.01)   # taken into the decode that waits for the lock
                previous = signal.signal(signal.SIGALRM, interrupt)
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                try:
                    with pytest.raises(KeyboardInterrupt):
                        scheduler.submit(second, [3], False)   # queued behind it
                finally:
                    signal.signal(signal.SIGALRM, previous)
                assert scheduler._pending == []
            decoding.join(10)
            assert (first.n_tokens, second.n_tokens) == (2, 0)
        out = batch.create_completion("Hello", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["finish_reason"] == "length" and batch.kv_stats().cells_used == 0


def test_verbose_requests_print_the_shared_timings_under_the_lock(tiny_model, capfd) -> None:
    """With verbose=True each completion prints the context's timings (llama-cpp-python's habit),
    under the lock of the decodes; none resets the counters the other requests share."""
    with BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, verbose=True) as batch:
        capfd.readouterr()
        batch.generate_batch(["Hello", "World"], max_tokens=3, temperature=0.0)
    printed = capfd.readouterr().err
    assert printed.count("llama_perf_context_print:        eval time") == 2, printed


def interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def test_requests_without_a_seed_draw_their_own_samples(smollm2_path: Path) -> None:
    """Each request draws its seed as llama-cpp-python's completions do on one Llama (issue 21, item 2):
    copying the prototype's seed gave every unseeded request the same text."""
    with BatchedLlama(smollm2_path, n_seq_max=3, n_threads=2, **BUDGET) as batch:
        texts = [r["choices"][0]["text"] for r in batch.generate_batch(["Once upon a time"] * 3, max_tokens=24,
                                                                       temperature=0.9)]
        texts.append(batch.create_completion("Once upon a time", max_tokens=24, temperature=0.9)["choices"][0]["text"])
    assert len(set(texts)) == 4, texts


@pytest.mark.parametrize("prompt", [[1.5, 2.5], [1, 10**9], [1, -3], ["a"]])
def test_a_request_of_no_tokens_fails_alone_and_the_batch_serves_on(tiny_model, prompt: List[Any]) -> None:
    """A bad token list raised inside the scheduler thread and every later request waited forever
    (issue 21, item 3); now it is refused before it reaches the shared decode."""
    with BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, verbose=False) as batch:
        with pytest.raises(ValueError, match="is not a token id of this model"):
            batch.create_completion(prompt, max_tokens=2)
        out = batch.create_completion("Hello", max_tokens=4, temperature=0.0)
        assert out["choices"][0]["finish_reason"] == "length" and batch.kv_stats().cells_used == 0


def test_an_unreferenced_batched_llama_is_freed(tiny_model) -> None:
    """The scheduler thread holds the scheduler, not the BatchedLlama (issue 21, item 7): dropping the
    last reference frees the model and context and stops the thread."""
    batch = BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, verbose=False)
    batch.generate_batch(["Hello", "World"], max_tokens=3, temperature=0.0)
    freed, thread = weakref.ref(batch), batch._scheduler._thread
    del batch
    gc.collect()
    assert freed() is None
    thread.join(10)
    assert not thread.is_alive()


def test_step_stats_split_a_step_into_decode_and_the_rest(smollm2_path: Path) -> None:
    with BatchedLlama(smollm2_path, n_seq_max=2, n_threads=2, **BUDGET) as batch:
        assert batch.step_stats().steps == 0
        batch.generate_batch(["Once upon a time", "The capital of France is"], max_tokens=20, temperature=0.0)
        stats = batch.step_stats()
    # one step per generated token at least (two prompts may share the first), every token decoded counted
    assert 19 <= stats.steps <= 40 and stats.tokens >= 2 * 19
    assert 0 < stats.decode_seconds < stats.step_seconds and 0 < stats.sample_seconds < stats.step_seconds
    assert 0 < stats.overhead < 1
    # the generated tokens fed back (19 a sequence) decode in single-token steps, but for a step
    # that a late prompt shared
    assert 2 * 19 - 2 <= stats.single_token_tokens <= 2 * 19 and stats.single_token_steps <= 40
    assert 0 < stats.single_token_seconds < stats.step_seconds and stats.single_token_tps > 0


def test_a_second_completion_in_one_sequence_truncates_its_own_sequence(smollm2_path: Path) -> None:
    """llama-cpp-python truncates to reuse a prompt's prefix, naming sequence 0; on a view that hit
    another request's sequence, and the next decode of both failed (issue 21, item 1)."""
    calls = [("first", "Once upon a time", 8), ("second", "The capital of France is", 60),
             ("second", "The capital of France is a", 8),      # past the compressed part: evaluated afresh
             ("second", "The capital of France is a", 8),      # the whole prompt cached
             ("first", "Once upon a time there", 8)]           # its own sequence untouched
    lone = {name: Llama(smollm2_path, n_threads=2, flash_attn=True, verbose=False, **BUDGET)
            for name in ("first", "second")}

    def complete(llm: Any, prompt: str, n: int) -> Recorded:
        recorder, settings = recorded(dict(max_tokens=n, temperature=0.0))
        return recorder, llm.create_completion(prompt, **settings)["choices"][0]["text"]

    try:
        expected = [complete(lone[name], prompt, n) for name, prompt, n in calls]
    finally:
        for llm in lone.values():
            llm.close()
    with BatchedLlama(smollm2_path, n_seq_max=2, n_threads=2, **BUDGET) as batch:
        with batch.sequence() as first, batch.sequence() as second:
            views = {"first": first, "second": second}
            got = []
            for name, prompt, n in calls:
                got.append(complete(views[name], prompt, n))
                if len(got) == 2:
                    assert second.kv_stats().compressions > 0   # the next truncation falls in the compressed part
    assert_each_as_alone(expected, [r for r, _ in got], [text for _, text in got])


def test_function_calling_that_completes_twice_leaves_other_requests_alone(smollm2_path: Path) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with BatchedLlama(smollm2_path, n_seq_max=2, n_threads=2, chat_format="chatml-function-calling",
                      **BUDGET) as batch:
        tool_call, plain = batch.generate_batch([messages, "Once upon a time"], max_tokens=24, temperature=0.0,
                                                settings=[dict(tools=tools, tool_choice="auto"), {}])
    assert not isinstance(tool_call, Exception), tool_call
    assert not isinstance(plain, Exception), plain
    assert tool_call["object"] == "chat.completion" and plain["choices"][0]["finish_reason"] == "length"


def test_multimodal_chat_handlers_are_refused(tiny_model) -> None:
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler.__new__(Llava15ChatHandler)   # no CLIP model needed to be refused
    with pytest.raises(ValueError, match="multimodal chat handler"):
        BatchedLlama(tiny_model(arch="llama"), n_seq_max=2, chat_handler=handler, verbose=False)


def test_state_operations_of_a_request_act_on_its_sequence_or_are_refused(smollm2_path: Path) -> None:
    with BatchedLlama(smollm2_path, n_seq_max=2, n_threads=2, **BUDGET) as batch:
        with batch.sequence() as first, batch.sequence() as second:
            first.create_completion("Hello", max_tokens=4, temperature=0.0)
            second.create_completion("Once upon a time " * 8, max_tokens=4, temperature=0.0)
            held = second.kv_stats().cells_used
            assert second.compress_now() and second.kv_stats().cells_used < held
            assert len(second.kept_positions(0, 0)) == 32 and first.kv_stats().compressions == 0
            with pytest.raises(RuntimeError, match="cannot be saved or loaded"):
                second.save_state()


def test_leaving_stream_batch_early_cancels_its_requests(smollm2_path: Path) -> None:
    """Closing the iterator waited for every request to finish (issue 21, item 5)."""
    with BatchedLlama(smollm2_path, n_seq_max=2, n_threads=2, **BUDGET) as batch:
        stream = batch.stream_batch(["Once upon a time"] * 3, max_tokens=600, temperature=0.0,
                                    logit_bias={batch._proto.token_eos(): float("-inf")})
        for _ in zip(range(6), stream):
            pass
        stream.close()
        decoded = batch.step_stats().tokens
        stats = batch.kv_stats()
    # the two running requests stopped within a step or two of the reader; the third never started
    assert decoded < 2 * 40 and stats.cells_used == 0
