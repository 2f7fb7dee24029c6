"""The decode scheduler of ``BatchedLlama``: one thread packs the tokens every sequence hands in
into the next ``llama_decode`` (continuous batching) and samples each sequence's next token with
that sequence's own sampler right after it.

It knows nothing of requests, prompts or texts: a sequence is a ``Decoding`` (``BatchedLlama``'s
per-request views). The thread holds the scheduler, never the ``BatchedLlama``, so an unreferenced
``BatchedLlama`` is freed (and stops its scheduler) like any object.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import llama_cpp
from llama_cpp import _internals as internals

# how long the scheduler waits for the sequences of the last decode to hand in their next token,
# so that they decode together; a sequence whose reader is slower than this waits for the next call
GATHER_TIMEOUT_S = 0.05
# how often a waiting sequence checks that the scheduler thread still runs
ALIVE_CHECK_S = 1.0


class Decoding(Protocol):
    """What the scheduler needs of a sequence that hands it tokens."""

    seq_id: int      # its sequence in the context
    n_tokens: int    # the tokens it holds: the position of the next one
    cancelled: bool  # its request went away: its tokens are refused

    def decoded(self, tokens: Sequence[int]) -> None:
        """Record tokens just decoded (before any sampling)."""

    def sample_decoded(self, ctx: internals.LlamaContext, idx: int) -> int:
        """Its next token, from the logits of row ``idx`` of the decode."""

    def decode_failed(self, error: BaseException) -> BaseException:
        """The error its request gets for a decode that failed with ``error``: its own (its sequence's
        compression failed), or ``error`` itself."""


class RequestCancelled(Exception):
    """The request was cancelled (a client went away) while it waited for the scheduler."""


@dataclass
class StepStats:
    """Where the scheduler's time went, summed over its decode steps since it started.

    A step runs from the end of one ``llama_decode`` to the end of the next: waiting for the
    sequences' next tokens (their Python loops: detokenization, chunks, handoffs between threads),
    packing the batch, ``llama_decode`` itself, then sampling each sequence's next token. What is
    not ``decode_seconds`` is the batching's own cost."""

    steps: int = 0
    tokens: int = 0               # tokens decoded (prompt chunks included)
    step_seconds: float = 0.0     # the whole steps
    decode_seconds: float = 0.0   # inside llama_decode
    sample_seconds: float = 0.0   # sampling after each decode
    max_sequences: int = 0        # most sequences one decode call carried
    # steps in which every sequence decoded one token (no prompt chunk): decoding proper
    single_token_steps: int = 0
    single_token_tokens: int = 0
    single_token_seconds: float = 0.0

    @property
    def overhead(self) -> float:
        """The share of the steps' time spent outside llama_decode."""
        return 1.0 - self.decode_seconds / self.step_seconds if self.step_seconds > 0 else 0.0

    @property
    def single_token_tps(self) -> Optional[float]:
        """Tokens per second over the steps that only decoded generated tokens (None if none ran)."""
        return self.single_token_tokens / self.single_token_seconds if self.single_token_seconds > 0 else None


@dataclass(eq=False)
class _Submission:
    """Tokens one sequence hands to the scheduler; answered with its next token."""

    view: Decoding
    tokens: List[int]
    sample: bool
    done: threading.Event = field(default_factory=threading.Event)
    token: Optional[int] = None
    error: Optional[BaseException] = None


class DecodeScheduler:
    """Decodes the sequences of one context together, from a thread of its own."""

    def __init__(self, ctx: internals.LlamaContext, n_batch: int, verbose: bool = False,
                 check_devices: Optional[Callable[[], None]] = None) -> None:
        self.ctx = ctx
        # raises when a device the context uses went away (an RPC server): its results are not the model's
        self._check_devices = check_devices
        self.n_batch = n_batch
        self.ctx_lock = threading.Lock()   # llama_decode and anything else that touches the context
        self._batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=verbose)
        self._lock = threading.Condition()
        self._pending: List[_Submission] = []
        self._active: Dict[int, Decoding] = {}
        self._last_batch: set = set()
        self._stats = StepStats()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rkv-batch-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------
    # what the request side calls
    # ------------------------------------------------------------------

    def add(self, view: Decoding) -> None:
        """A sequence that will hand in tokens (the scheduler waits for it between decodes)."""
        with self._lock:
            self._active[view.seq_id] = view

    def remove(self, seq_id: int) -> None:
        with self._lock:
            self._active.pop(seq_id, None)
            self._lock.notify_all()   # the scheduler no longer waits for it

    def submit(self, view: Decoding, tokens: List[int], sample: bool) -> Optional[int]:
        """Decode ``tokens`` of ``view``'s sequence in the next call; the token sampled after them."""
        if view.cancelled:
            raise RequestCancelled("the request was cancelled")
        sub = _Submission(view, tokens, sample)
        with self._lock:
            if self._closed:
                raise RuntimeError("this BatchedLlama is closed")
            self._pending.append(sub)
            self._lock.notify_all()
        try:
            while not sub.done.wait(ALIVE_CHECK_S):
                if not self._thread.is_alive():   # never expected: _run fails batches, not itself
                    raise RuntimeError("the BatchedLlama's scheduler stopped; create a new BatchedLlama")
        except BaseException:
            # an interrupt (KeyboardInterrupt, ...): withdraw the tokens, or let their decode end before
            # the request unwinds and its sequence is emptied
            with self._lock:
                queued = sub in self._pending
                if queued:
                    self._pending.remove(sub)
            while not queued and not sub.done.wait(ALIVE_CHECK_S) and self._thread.is_alive():
                pass
            raise
        if sub.error is not None:
            raise sub.error
        return sub.token

    def stats(self) -> StepStats:
        """A copy of the time figures (see ``StepStats``)."""
        with self._lock:
            return StepStats(**vars(self._stats))

    @property
    def closed(self) -> bool:
        return self._closed

    @contextmanager
    def between_decodes(self) -> Iterator[None]:
        """The shared context between two decodes; a RuntimeError once the BatchedLlama is closed."""
        with self.ctx_lock:
            if self._closed:
                raise RuntimeError("this BatchedLlama is closed")
            yield

    def close(self) -> None:
        """Stop the thread (waiting submissions fail) and free the batch; the context is the caller's."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self.ctx_lock:
            self._batch.close()

    # ------------------------------------------------------------------
    # the thread
    # ------------------------------------------------------------------

    def _run(self) -> None:
        step_start: Optional[float] = time.perf_counter()
        while True:
            with self._lock:
                if not self._active and not self._pending:
                    step_start = None   # idle: the wait for a new request is no step
                batch = self._gather()
                if batch is None:
                    return
            if step_start is None:
                step_start = time.perf_counter()
            if not batch:
                continue
            try:
                decode_s, sample_s = self._decode(batch)
            except BaseException as exc:  # noqa: BLE001 - a request's failure must not stop the others' scheduler
                for sub in batch:
                    sub.error = sub.error or exc
                    sub.done.set()
                batch = None
                continue
            end = time.perf_counter()
            with self._lock:
                stats = self._stats
                stats.steps += 1
                stats.tokens += sum(len(sub.tokens) for sub in batch)
                stats.step_seconds += end - step_start
                stats.decode_seconds += decode_s
                stats.sample_seconds += sample_s
                stats.max_sequences = max(stats.max_sequences, len({id(sub.view) for sub in batch}))
                if all(len(sub.tokens) == 1 for sub in batch):
                    stats.single_token_steps += 1
                    stats.single_token_tokens += len(batch)
                    stats.single_token_seconds += end - step_start
            step_start = end
            # while the thread waits, it holds no request (the views hold their BatchedLlama)
            batch = None

    def _gather(self) -> Optional[List[_Submission]]:
        """The submissions of the next decode (called with the lock held); None once closed."""
        while not (self._pending or self._closed):
            self._lock.wait()
        if self._closed:
            for sub in self._pending:
                sub.error = RuntimeError("this BatchedLlama is closed")
                sub.done.set()
            self._pending.clear()
            return None
        # give the sequences of the last decode a moment to hand in their next tokens
        deadline = time.monotonic() + GATHER_TIMEOUT_S
        while self._pending and not self._closed:
            waiting = {sub.view.seq_id for sub in self._pending}
            expected = {s for s in self._last_batch if s in self._active}
            left = deadline - time.monotonic()
            if expected <= waiting or left <= 0:
                break
            self._lock.wait(left)
        batch, room = [], self.n_batch
        for sub in list(self._pending):
            if len(sub.tokens) <= room:
                batch.append(sub)
                room -= len(sub.tokens)
                self._pending.remove(sub)
        self._last_batch = {sub.view.seq_id for sub in batch}
        return batch

    def _decode(self, batch: List[_Submission]) -> Tuple[float, float]:
        """Decode one batch and sample; the seconds spent in llama_decode and in sampling."""
        b = self._batch.batch
        n = 0
        last: Dict[int, int] = {}
        for sub in batch:
            view = sub.view
            for k, token in enumerate(sub.tokens):
                b.token[n] = token
                b.pos[n] = view.n_tokens + k
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = view.seq_id
                b.logits[n] = sub.sample and k == len(sub.tokens) - 1
                n += 1
            last[id(sub)] = n - 1
        b.n_tokens = n
        with self.ctx_lock:
            start = time.perf_counter()
            rc = llama_cpp.llama_decode(self.ctx.ctx, b)
            decoded = time.perf_counter()
            error: Optional[BaseException] = None
            if rc != 0:
                error = RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens of "
                                     f"{len(batch)} sequences")
            elif self._check_devices is not None:
                try:
                    self._check_devices()
                except Exception as exc:  # noqa: BLE001 - handed to every request of the batch
                    error = exc
            if error is None:
                for sub in batch:
                    sub.view.decoded(sub.tokens)
                for sub in filter(lambda sub: sub.sample, batch):
                    try:
                        sub.token = sub.view.sample_decoded(self.ctx, last[id(sub)])
                    except Exception as exc:  # noqa: BLE001 - handed to the request
                        sub.error = exc
            sampled = time.perf_counter()
        if error is not None:
            batch = self._fail(batch, error)
        for sub in batch:
            sub.done.set()
        return decoded - start, sampled - decoded

    def _fail(self, batch: List[_Submission], error: BaseException) -> List[_Submission]:
        """Hands each submission of a failed decode its error, and returns those answered: when some
        sequences' own compression failed, only theirs; the others go with the next decode (llama.cpp
        refuses a call before it computes any of it, so their caches are as they were)."""
        errors = {id(sub): sub.view.decode_failed(error) for sub in batch}
        own = [sub for sub in batch if errors[id(sub)] is not error]
        if own and len(own) < len(batch):
            with self._lock:
                self._pending[:0] = [sub for sub in batch if errors[id(sub)] is error]
            batch = own
        for sub in batch:
            sub.error = errors[id(sub)]
        return batch
