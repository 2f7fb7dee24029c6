"""``BatchedLlama``: many sequences decoded together in one context, each with its own budget.

Each request gets a sequence of its own (one KV stream, compressed on its own) and runs
llama-cpp-python's own ``create_completion`` / ``create_chat_completion`` on a per-sequence view
of the model, so prompts, chat templates, sampling, stop strings, end-of-generation handling and
the OpenAI-shaped results are exactly those of ``Llama``. Only evaluation differs: a view hands
its tokens to one scheduler thread, which packs every waiting sequence into the next
``llama_decode`` (continuous batching: one token per decoding sequence, prompts in chunks of at
most ``kv_buffer`` tokens beside them) and samples each sequence's next token with that
sequence's own sampler right after the decode. A finished request frees its stream for the next.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from . import _native
from .llama import CACHE_PAD, KVStats, Llama

Prompt = Union[str, List[int], List[Dict[str, Any]]]   # text, tokens, or chat messages

# how long the scheduler waits for the sequences of the last decode to hand in their next token,
# so that they decode together; a sequence whose reader is slower than this waits for the next call
GATHER_TIMEOUT_S = 0.05


def _available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class StepStats:
    """Where the scheduler's time went, summed over its decode steps since the ``BatchedLlama`` started.

    A step runs from the end of one ``llama_decode`` to the end of the next: waiting for the
    sequences' next tokens (their Python loops: detokenization, chunks, handoffs between threads),
    packing the batch, ``llama_decode`` itself, then sampling each sequence's next token. What is
    not ``decode_seconds`` is the batching's own cost."""

    steps: int = 0
    tokens: int = 0               # tokens decoded (prompt chunks included)
    step_seconds: float = 0.0     # the whole steps
    decode_seconds: float = 0.0   # inside llama_decode
    sample_seconds: float = 0.0   # sampling after each decode

    @property
    def overhead(self) -> float:
        """The share of the steps' time spent outside llama_decode."""
        return 1.0 - self.decode_seconds / self.step_seconds if self.step_seconds > 0 else 0.0


class RequestCancelled(Exception):
    """The request was cancelled (a client went away) while it waited for the scheduler."""


@dataclass(eq=False)
class _Submission:
    """Tokens one sequence hands to the scheduler; answered with its next token."""

    view: "_SequenceView"
    tokens: List[int]
    sample: bool
    done: threading.Event = field(default_factory=threading.Event)
    token: Optional[int] = None
    error: Optional[BaseException] = None


class _SequenceView(Llama):
    """One request's view of the model: ``Llama``'s completion code on sequence ``seq_id``.

    A shallow copy of the prototype ``Llama`` (same model, tokenizer, chat handler, settings) with
    its own token history; ``eval`` goes through the scheduler, and ``sample`` returns the token
    the scheduler drew with this view's sampler right after the decode.
    """

    _owner: "BatchedLlama"
    _seq_id: int
    _next_token: Optional[int]
    cancelled: bool

    def eval(self, tokens: Sequence[int]) -> None:
        tokens = list(tokens)
        if not tokens and self.n_tokens == 0:
            # Llama.generate samples right after evaluating the prompt: with no token there are no
            # logits to sample from (a request's mistake, not the server's)
            raise ValueError("the prompt is empty: there is no token to continue from (an empty text, "
                             "and this model adds no BOS token)")
        if self.n_tokens + len(tokens) > self._n_ctx:
            raise ValueError(f"evaluating {len(tokens)} tokens after {self.n_tokens} would exceed the context "
                             f"(n_ctx = {self._n_ctx})")
        chunk = self._owner.chunk_size
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            # only the last chunk's logits are sampled, as Llama.generate samples after eval
            # the scheduler records the part in input_ids and n_tokens (before it samples)
            self._next_token = self._owner._submit(self, part, sample=start + chunk >= len(tokens))

    def sample(self, *args: Any, **kwargs: Any) -> int:
        if self._next_token is None:
            raise RuntimeError("sample() before eval(): a sequence view samples what its last decode produced")
        token, self._next_token = self._next_token, None
        return token

    def reset(self) -> None:
        self.n_tokens = 0  # a view starts from an empty sequence; the scheduler frees it at the end

    def n_ctx(self) -> int:
        return self._n_ctx

    def _create_completion(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return (yield from llama_cpp.Llama._create_completion(self, *args, **kwargs))
        except ValueError as exc:
            if str(exc).startswith("Requested tokens ("):  # llama-cpp-python names the whole batched context
                n = str(exc)[len("Requested tokens ("):].split(")", 1)[0]
                raise ValueError(f"Requested tokens ({n}) exceed the context window of {self._n_ctx} tokens "
                                 f"of one sequence") from None
            raise

    def kv_stats(self) -> KVStats:
        return self._owner.kv_stats(self._seq_id, n_tokens=self.n_tokens)

    def close(self) -> None:
        pass  # the model and the context belong to the BatchedLlama

    def __del__(self) -> None:
        pass


class BatchedLlama:
    """Up to ``n_seq_max`` requests decoded together, each in its own KV stream.

    ``kv_budget`` and the other ``kv_*`` settings are those of ``Llama`` and apply to every
    sequence; without ``kv_budget`` each sequence has a full cache of ``n_ctx`` cells. Other
    keyword arguments go to ``Llama`` (``n_threads``, ``n_gpu_layers``, ...).

    Flash attention is on by default: in the pinned llama.cpp, attention without it gives a
    sequence slightly different logits when another sequence's tokens share its decode call
    (the call is split into ubatches of equal tokens per stream), so greedy texts could part from
    what the request gives alone. With it, a request in a batch is usually bitwise what it is alone
    under ``Llama(..., flash_attn=True)``, but not always: how the scheduler packs the prompt chunks
    of several sequences into ubatches depends on timing, ggml's CPU kernels round a batch of rows
    differently from one row, and with a budget a compression can turn such a difference into
    another kept set. Seen: one greedy SmolLM2 answer of six parting from the lone one (on an
    AVX2-only CPU, and on a loaded AVX-512 one), and tiny f32 gpt-oss models parting after their
    first compression.

    ``create_completion`` and ``create_chat_completion`` take the arguments of ``Llama``'s and
    may be called from many threads at once: the calls decode together, and a call beyond
    ``n_seq_max`` waits for a free sequence. ``generate_batch`` and ``stream_batch`` run a list
    of requests that way.
    """

    def __init__(
        self,
        model_path: Union[str, "os.PathLike[str]"],
        *,
        n_seq_max: int = 4,
        kv_budget: Optional[int] = None,
        kv_buffer: int = 128,
        kv_method: str = "rkv",
        kv_window: int = 8,
        kv_lambda: float = 0.1,
        n_ctx: int = 0,
        n_batch: int = 512,
        verbose: bool = False,
        **kwargs: Any,
    ) -> None:
        max_seq = int(llama_cpp.llama_max_parallel_sequences())
        if not 1 <= n_seq_max <= max_seq:
            raise ValueError(f"n_seq_max must be between 1 and {max_seq} (llama.cpp's limit), got {n_seq_max}")
        for name in ("logits_all", "embedding", "draft_model"):
            if kwargs.get(name):
                raise ValueError(f"{name} is not supported by BatchedLlama")
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be positive (or 0: the model's training context), got {n_ctx}")
        if not kwargs.setdefault("flash_attn", True) and n_seq_max > 1:
            warnings.warn("BatchedLlama without flash attention: in llama.cpp, a sequence's logits then depend "
                          "on the other sequences in its decode calls", RuntimeWarning, stacklevel=2)
        self._closed = True   # until the scheduler runs
        self.n_seq_max = n_seq_max
        budget = dict(kv_budget=kv_budget, kv_buffer=kv_buffer, kv_method=kv_method, kv_window=kv_window,
                      kv_lambda=kv_lambda) if kv_budget is not None else {}
        # The prototype holds the model and everything per-request views share; its own small
        # context is replaced by the batched one below.
        proto_ctx = dict(n_ctx=n_ctx) if kv_budget is not None else dict(n_ctx=CACHE_PAD, n_batch=CACHE_PAD)
        self._proto = Llama(os.fspath(model_path), verbose=verbose, **proto_ctx, **budget, **kwargs)
        try:
            self._setup(n_ctx, n_batch, verbose)
        except BaseException:
            if getattr(self, "_ctx", None) is not None:
                self._ctx.close()
            self._proto.close()
            raise
        self._free = list(range(n_seq_max))
        self._slots = threading.Semaphore(n_seq_max)
        self._lock = threading.Condition()
        self._pending: List[_Submission] = []
        self._active: Dict[int, _SequenceView] = {}
        self._last_batch: set = set()
        self._step_stats = StepStats()
        self._ctx_lock = threading.Lock()   # llama_decode and anything else that touches the context
        self._scheduler = threading.Thread(target=self._run, name="rkv-batch-scheduler", daemon=True)
        self._closed = False
        self._scheduler.start()

    def _setup(self, n_ctx: int, n_batch: int, verbose: bool) -> None:
        proto = self._proto
        self.kv_config = proto.kv_config
        if self.kv_config is not None:
            cells = proto._ctx.n_ctx()                      # budget + buffer, padded
            self.n_ctx_seq = proto.n_ctx()                  # the logical context
            self.chunk_size = self.kv_config.buffer
            # the decodes of all sequences plus prompt chunks (llama.cpp's default batch of 512 unless the
            # buffer is larger); the engine takes at most `buffer` tokens of a sequence per call
            buffer = self.kv_config.buffer
            per_call = min(self.n_seq_max * buffer, max(self.n_seq_max + buffer, 512))
        else:
            self.n_ctx_seq = n_ctx or proto._model.n_ctx_train()
            cells = -(-self.n_ctx_seq // CACHE_PAD) * CACHE_PAD
            self.chunk_size = n_batch
            per_call = self.n_seq_max + n_batch
        self.cells_per_seq = cells
        self.n_batch = per_call
        params = llama_cpp.llama_context_params.from_buffer_copy(proto.context_params)
        params.n_ctx = cells * self.n_seq_max
        params.n_seq_max = self.n_seq_max
        params.kv_unified = False          # one stream per sequence: each is compressed on its own
        params.n_batch = params.n_ubatch = per_call
        self._check_memory(_native.bytes_per_cell(proto._ctx.ctx) * cells * self.n_seq_max, cells)
        proto._ctx.close()
        try:
            self._ctx = internals.LlamaContext(model=proto._model, params=params, verbose=verbose)
        except ValueError as exc:
            raise ValueError(
                f"cannot create a context of {self.n_seq_max} sequences x {cells} KV cells "
                f"({self.n_seq_max * cells} cells): not enough memory? Lower n_seq_max, kv_budget or n_ctx"
            ) from exc
        proto._ctx = self._ctx
        proto.context_params = params
        if self.kv_config is not None:
            try:
                _native.enable(self._ctx.ctx, self.kv_config)
            except _native.RkvError as exc:
                raise ValueError(f"cannot compress this model's KV cache: {exc}") from exc
        self._batch = internals.LlamaBatch(n_tokens=per_call, embd=0, n_seq_max=1, verbose=verbose)
        self._n_vocab = proto.n_vocab()

    def _check_memory(self, kv_bytes: int, cells: int) -> None:
        """Refuse a host-memory cache larger than the memory available: llama.cpp clears the cache
        buffer when it creates it, so an overcommitted allocation would end in the OOM killer."""
        on_host = self._proto.model_params.n_gpu_layers == 0 or not self._proto.context_params.offload_kqv
        available = _available_memory()
        if on_host and available is not None and kv_bytes > available:
            raise ValueError(
                f"cannot create a context of {self.n_seq_max} sequences x {cells} KV cells: its K/V would take "
                f"{kv_bytes / 2**30:.1f} GiB and {available / 2**30:.1f} GiB of memory are available; "
                f"lower n_seq_max, kv_budget or n_ctx")

    # ------------------------------------------------------------------
    # requests
    # ------------------------------------------------------------------

    @contextmanager
    def sequence(self) -> Iterator[_SequenceView]:
        """A view of the model on a free sequence (waits for one), freed when the block ends."""
        self._check_open()
        self._slots.acquire()
        with self._lock:
            seq_id = self._free.pop(0)
            # a shallow copy (copy.copy would go through Llama's pickling, which reloads the model)
            view = _SequenceView.__new__(_SequenceView)
            view.__dict__.update(self._proto.__dict__)
            view._owner, view._seq_id, view._next_token, view.cancelled = self, seq_id, None, False
            view._sampler, view.n_tokens, view._tokens_evaluated = None, 0, 0
            view._detokenizer = self._proto._detokenizer.fork()   # what it remembers is this request's
            view._n_ctx = self.n_ctx_seq
            view.input_ids = np.zeros((self.n_ctx_seq,), dtype=np.intc)
            self._active[seq_id] = view
        try:
            yield view
        finally:
            self._release(seq_id)

    def _release(self, seq_id: int) -> None:
        """Empty a finished request's stream (a compressed one starts afresh) and give it back."""
        with self._lock:
            del self._active[seq_id]
            self._lock.notify_all()   # the scheduler no longer waits for it
        with self._ctx_lock:          # not during a decode
            if not self._closed:
                llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx.ctx), seq_id, -1, -1)
        with self._lock:
            self._free.append(seq_id)
        self._slots.release()

    def create_completion(self, prompt: Union[str, List[int]], **kwargs: Any) -> Any:
        """``Llama.create_completion`` on a sequence of its own; with ``stream=True`` an iterator."""
        return self._run_request("create_completion", dict(prompt=prompt, **kwargs))

    def create_chat_completion(self, messages: List[Dict[str, Any]], **kwargs: Any) -> Any:
        """``Llama.create_chat_completion`` on a sequence of its own; with ``stream=True`` an iterator."""
        return self._run_request("create_chat_completion", dict(messages=messages, **kwargs))

    def _run_request(self, method: str, kwargs: Dict[str, Any]) -> Any:
        if not kwargs.get("stream"):
            with self.sequence() as view:
                return getattr(view, method)(**kwargs)
        return self._stream(method, kwargs)

    def _stream(self, method: str, kwargs: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        with self.sequence() as view:
            chunks = getattr(view, method)(**kwargs)
            try:
                yield from chunks
            finally:
                view.cancelled = True   # a reader that stops early frees the sequence
                chunks.close()

    def generate_batch(self, prompts: Sequence[Prompt], **kwargs: Any) -> List[Any]:
        """Completions of every prompt (text or tokens) or chat (a list of messages), in order.

        Keyword arguments are those of ``create_completion`` / ``create_chat_completion`` for all
        requests; a list of dicts in ``settings`` gives per-request ones. A request that fails
        gives its exception in its place.
        """
        settings = self._settings(prompts, kwargs)
        with ThreadPoolExecutor(max_workers=len(prompts) or 1, thread_name_prefix="rkv-request") as pool:
            futures = [pool.submit(self._one, prompt, s) for prompt, s in zip(prompts, settings)]
            return [f.exception() or f.result() for f in futures]

    def stream_batch(self, prompts: Sequence[Prompt], **kwargs: Any) -> Iterator[Tuple[int, Any]]:
        """``(index, chunk)`` of every request as its pieces come; a failed request yields
        ``(index, exception)`` once."""
        settings = self._settings(prompts, kwargs)
        out: "queue.Queue[Tuple[int, Any]]" = queue.Queue()
        finished = object()

        def run(i: int, prompt: Prompt, s: Dict[str, Any]) -> None:
            try:
                for chunk in self._one(prompt, dict(s, stream=True)):
                    out.put((i, chunk))
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                out.put((i, exc))
            out.put((i, finished))

        with ThreadPoolExecutor(max_workers=len(prompts) or 1, thread_name_prefix="rkv-request") as pool:
            for i, (prompt, s) in enumerate(zip(prompts, settings)):
                pool.submit(run, i, prompt, s)
            remaining = len(prompts)
            while remaining:
                i, item = out.get()
                if item is finished:
                    remaining -= 1
                else:
                    yield i, item

    @staticmethod
    def _settings(prompts: Sequence[Prompt], kwargs: Dict[str, Any]) -> List[Dict[str, Any]]:
        per_request = kwargs.pop("settings", None) or [{} for _ in prompts]
        if len(per_request) != len(prompts):
            raise ValueError(f"settings has {len(per_request)} entries for {len(prompts)} prompts")
        return [dict(kwargs, **s) for s in per_request]

    def _one(self, prompt: Prompt, settings: Dict[str, Any]) -> Any:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            return self.create_chat_completion(prompt, **settings)
        return self.create_completion(prompt, **settings)

    # ------------------------------------------------------------------
    # the scheduler
    # ------------------------------------------------------------------

    def _submit(self, view: _SequenceView, tokens: List[int], sample: bool) -> Optional[int]:
        """Decode ``tokens`` of ``view``'s sequence in the next call; the token sampled after them."""
        if view.cancelled:
            raise RequestCancelled("the request was cancelled")
        sub = _Submission(view, tokens, sample)
        with self._lock:
            if self._closed:
                raise RuntimeError("this BatchedLlama is closed")
            self._pending.append(sub)
            self._lock.notify_all()
        sub.done.wait()
        if sub.error is not None:
            raise sub.error
        return sub.token

    def _run(self) -> None:
        step_start = time.perf_counter()
        while True:
            with self._lock:
                if not self._active and not self._pending:
                    step_start = None   # idle: the wait for a new request is no step
                batch = self._gather()
                if batch is None:
                    return
            if step_start is None:
                step_start = time.perf_counter()
            if batch:
                decode_s, sample_s = self._decode(batch)
                end = time.perf_counter()
                with self._lock:
                    stats = self._step_stats
                    stats.steps += 1
                    stats.tokens += sum(len(sub.tokens) for sub in batch)
                    stats.step_seconds += end - step_start
                    stats.decode_seconds += decode_s
                    stats.sample_seconds += sample_s
                step_start = end

    def _gather(self) -> Optional[List[_Submission]]:
        """The submissions of the next decode (called with the lock held); None once closed."""
        while not (self._pending or self._closed):
            self._lock.wait()
        if self._closed:
            for sub in self._pending:
                sub.error = RuntimeError("this BatchedLlama was closed")
                sub.done.set()
            self._pending.clear()
            return None
        # give the sequences of the last decode a moment to hand in their next tokens
        deadline = time.monotonic() + GATHER_TIMEOUT_S
        while self._pending and not self._closed:
            waiting = {sub.view._seq_id for sub in self._pending}
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
        self._last_batch = {sub.view._seq_id for sub in batch}
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
                b.seq_id[n][0] = view._seq_id
                b.logits[n] = sub.sample and k == len(sub.tokens) - 1
                n += 1
            last[id(sub)] = n - 1
        b.n_tokens = n
        with self._ctx_lock:
            start = time.perf_counter()
            rc = llama_cpp.llama_decode(self._ctx.ctx, b)
            decoded = time.perf_counter()
            if rc != 0:
                error = RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens of "
                                     f"{len(batch)} sequences")
                for sub in batch:
                    sub.error = error
            else:
                # what Llama.eval records, recorded before sampling: logits processors (min_tokens,
                # ...) read the view's input_ids up to the tokens just decoded, as with Llama
                for sub in batch:
                    view = sub.view
                    view.input_ids[view.n_tokens:view.n_tokens + len(sub.tokens)] = sub.tokens
                    view.n_tokens += len(sub.tokens)
                    view._tokens_evaluated += len(sub.tokens)
                for sub in filter(lambda sub: sub.sample, batch):
                    try:
                        sub.token = sub.view._sampler.sample(self._ctx, last[id(sub)])
                    except Exception as exc:  # noqa: BLE001 - handed to the request
                        sub.error = exc
            sampled = time.perf_counter()
        for sub in batch:
            sub.done.set()
        return decoded - start, sampled - decoded

    # ------------------------------------------------------------------
    # figures and lifetime
    # ------------------------------------------------------------------

    def kv_stats(self, seq_id: Optional[int] = None, *, n_tokens: Optional[int] = None) -> KVStats:
        """One sequence's figures, or (``seq_id`` None) the sums over all sequences, with
        ``cells_max`` the cells of the whole context."""
        if seq_id is None:
            parts = [self.kv_stats(s) for s in range(self.n_seq_max)]
            total = lambda name: sum(getattr(p, name) for p in parts)  # noqa: E731
            first = parts[0]
            return KVStats(first.method, first.budget, first.buffer, total("compressions"), total("evicted_tokens"),
                           total("cells_used"), total("cells_peak"), total("kv_bytes_used"), total("kv_bytes_full"),
                           total("n_tokens"), total("compress_seconds"), n_ctx=self.n_ctx_seq,
                           cells_max=self.cells_per_seq * self.n_seq_max, kv_bytes_window=total("kv_bytes_window"))
        cfg = self.kv_config
        with self._ctx_lock:
            if cfg is not None:
                s = _native.seq_stats(self._ctx.ctx, seq_id)
                return KVStats(cfg.method, cfg.budget, cfg.buffer, s.n_compressions, s.n_evicted, s.cells_used,
                               s.cells_peak, s.kv_bytes_used, s.kv_bytes_full, s.n_tokens, s.compress_seconds,
                               pos_compacted=s.pos_compacted, n_ctx=self.n_ctx_seq,
                               cells_max=cfg.budget + cfg.buffer, kv_bytes_window=s.kv_bytes_window)
            memory = llama_cpp.llama_get_memory(self._ctx.ctx)
            n = int(llama_cpp.llama_memory_seq_pos_max(memory, seq_id)) + 1 if n_tokens is None else n_tokens
            per_cell = _native.bytes_per_cell(self._ctx.ctx)
        return KVStats("full", None, None, 0, 0, n, n, n * per_cell, n * per_cell, n, 0.0,
                       n_ctx=self.n_ctx_seq, cells_max=self.cells_per_seq)

    def step_stats(self) -> StepStats:
        """A copy of the scheduler's time figures (see ``StepStats``)."""
        with self._lock:
            return StepStats(**vars(self._step_stats))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this BatchedLlama is closed")

    def close(self) -> None:
        """Stop the scheduler (waiting requests fail) and free the context and the model."""
        if getattr(self, "_closed", True):
            return
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._scheduler.join()
        with self._ctx_lock:   # a request that ends now no longer touches the context
            self._batch.close()
            self._ctx.close()      # ours, before the model it uses: the prototype's stack holds the model
            self._proto.close()

    def __enter__(self) -> "BatchedLlama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
