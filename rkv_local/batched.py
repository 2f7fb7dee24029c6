"""``BatchedLlama``: many sequences decoded together in one context, each with its own budget.

Each request gets a sequence of its own (one KV stream, compressed on its own) and runs
llama-cpp-python's own ``create_completion`` / ``create_chat_completion`` on a per-sequence view
of the model, so prompts, chat templates, sampling, stop strings, end-of-generation handling and
the OpenAI-shaped results are exactly those of ``Llama``. Only evaluation differs: a view hands
its tokens to the scheduler (``rkv_local.scheduler``), whose thread packs every waiting sequence
into the next ``llama_decode`` (continuous batching: one token per decoding sequence, prompts in
chunks of at most ``kv_buffer`` tokens beside them) and samples each sequence's next token with
that sequence's own sampler right after the decode. A finished request frees its stream for the next.
"""
from __future__ import annotations

import ctypes
import os
import queue
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals
from llama_cpp import llama_chat_format

from . import _native
from .llama import CACHE_PAD, Llama, kv_settings_from, padded_cells
from .sequence import KVSequence, KVStats
from .sampling import check_grammar, check_logit_bias
from .scheduler import DecodeScheduler, RequestCancelled, StepStats

__all__ = ["BatchedLlama", "RequestCancelled", "StepStats"]

Prompt = Union[str, List[int], List[Dict[str, Any]]]   # text, tokens, or chat messages

def available_memory() -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_NO_REQUEST_STATE = ("the state of one BatchedLlama request cannot be saved or loaded (llama.cpp's state is the "
                     "whole context's); use Llama for save_state/load_state")


class _SequenceContext:
    """A view's context: the shared one, except that llama-cpp-python's cache calls act on the view's
    own sequence (llama-cpp-python names sequence 0, or -1 for it)."""

    def __init__(self, ctx: internals.LlamaContext, sequence: KVSequence, scheduler: DecodeScheduler) -> None:
        self._shared, self._sequence, self._scheduler = ctx, sequence, scheduler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared, name)

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        return self._sequence.truncate(p0, p1)

    def kv_cache_clear(self) -> None:
        self._sequence.clear()

    def print_timings(self) -> None:   # Llama(verbose=True) after each completion
        with self._scheduler.ctx_lock:
            if not self._scheduler.closed:
                self._shared.print_timings()

    def reset_timings(self) -> None:
        pass  # the shared context's counters cover every request: one request must not reset the others'

    def _refused(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a BatchedLlama request cannot copy, keep or shift sequences of the shared cache")

    kv_cache_seq_cp = kv_cache_seq_keep = kv_cache_seq_shift = _refused


class _SequenceView(Llama):
    """One request's view of the model: ``Llama``'s completion code on its own sequence.

    A shallow copy of the prototype ``Llama`` (same model, tokenizer, chat handler, settings) with
    its own token history and ``KVSequence`` (everything ``Llama`` does to its cache, on this
    sequence, between the scheduler's decodes); what differs: ``eval`` hands the tokens to the
    scheduler, and ``sample`` returns the token the scheduler drew with this view's sampler right
    after the decode (the view is the scheduler's ``Decoding``).
    """

    _owner_name = "BatchedLlama"
    _owner: "BatchedLlama"
    _next_token: Optional[int]
    cancelled: bool

    @property
    def seq_id(self) -> int:
        return self._sequence.seq_id

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
        self._count_prompt(tokens)
        n_vocab = self._owner._n_vocab
        for token in tokens:
            # checked here: the scheduler decodes this request's tokens in one call with others'
            if not isinstance(token, (int, np.integer)) or not 0 <= token < n_vocab:
                raise ValueError(f"{token!r} is not a token id of this model (0 to {n_vocab - 1})")
        chunk = self._owner.chunk_size
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            # only the last chunk's logits are sampled, as Llama.generate samples after eval
            self._next_token = self._owner._scheduler.submit(self, part, sample=start + chunk >= len(tokens))

    # the scheduler's side (scheduler.Decoding)

    def decoded(self, tokens: Sequence[int]) -> None:
        # what Llama.eval records, recorded before sampling: logits processors (min_tokens, ...) read
        # input_ids up to the tokens just decoded, as with Llama
        self.input_ids[self.n_tokens:self.n_tokens + len(tokens)] = tokens
        self.n_tokens += len(tokens)
        self._tokens_evaluated += len(tokens)

    def sample_decoded(self, ctx: internals.LlamaContext, idx: int) -> int:
        return self._sampler.sample(ctx, idx)   # the sampler llama-cpp-python's generate made for this request

    def decode_failed(self, error: BaseException) -> BaseException:
        return self._compression_error(error) or error

    def sample(self, *args: Any, **kwargs: Any) -> int:
        if self._next_token is None:
            raise RuntimeError("sample() before eval(): a sequence view samples what its last decode produced")
        token, self._next_token = self._next_token, None
        self._sampled.append(token)
        return token

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        self._sampled = []
        return (yield from Llama.generate(self, tokens, *args, **kwargs))

    def usage(self) -> Dict[str, int]:
        """The last completion's ``usage``, as llama-cpp-python counts it for a whole answer (its
        prompt; the tokens it wrote, an end token not counted): a stream has none."""
        written = len(self._sampled)
        if written and llama_cpp.llama_vocab_is_eog(self._model.vocab, self._sampled[-1]):
            written -= 1
        return dict(prompt_tokens=self._prompt_tokens, completion_tokens=written,
                    total_tokens=self._prompt_tokens + written)

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

    def save_state(self) -> llama_cpp.LlamaState:
        raise RuntimeError(_NO_REQUEST_STATE)

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        raise RuntimeError(_NO_REQUEST_STATE)

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
        n_ctx: int = 0,
        n_batch: int = 512,
        n_ubatch: Optional[int] = None,
        verbose: bool = False,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: ``Llama``'s, the ``kv_*`` settings of ``KVSettings`` included."""
        settings = kv_settings_from(kwargs)
        max_seq = int(llama_cpp.llama_max_parallel_sequences())
        if not 1 <= n_seq_max <= max_seq:
            raise ValueError(f"n_seq_max must be between 1 and {max_seq} (llama.cpp's limit), got {n_seq_max}")
        for name in ("logits_all", "embedding", "draft_model"):
            if kwargs.get(name):
                raise ValueError(f"{name} is not supported by BatchedLlama")
        if n_ctx < 0:
            raise ValueError(f"n_ctx must be positive (or 0: the model's training context), got {n_ctx}")
        for name, value in (("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        handler = kwargs.get("chat_handler")
        if isinstance(handler, (llama_chat_format.Llava15ChatHandler, llama_chat_format.MTMDChatHandler)):
            # they decode image chunks on sequence 0 themselves, outside the batch's scheduler
            raise ValueError(f"{type(handler).__name__} (a multimodal chat handler) is not supported by "
                             f"BatchedLlama; use Llama for images")
        if not kwargs.setdefault("flash_attn", True) and n_seq_max > 1:
            warnings.warn("BatchedLlama without flash attention: in llama.cpp, a sequence's logits then depend "
                          "on the other sequences in its decode calls", RuntimeWarning, stacklevel=2)
        self._closed = True   # until the scheduler runs
        self.n_seq_max = n_seq_max
        # The prototype holds the model and everything per-request views share; its own small
        # context is replaced by the batched one below.
        proto_ctx = dict(n_ctx=n_ctx) if settings.compressed else dict(n_ctx=CACHE_PAD, n_batch=CACHE_PAD)
        self._proto = Llama(os.fspath(model_path), verbose=verbose, **proto_ctx, **settings.to_kwargs(), **kwargs)
        try:
            self._setup(n_ctx, n_batch, n_ubatch, verbose)
        except BaseException:
            if getattr(self, "_ctx", None) is not None:
                self._ctx.close()
            self._proto.close()
            raise
        self._free = list(range(n_seq_max))
        self._lock = threading.Lock()      # the free sequences, the prototype's seed, closing
        self._sequence_freed = threading.Condition(self._lock)
        self._model_freed = False
        check = self._proto._check_rpc_servers if self._proto._rpc_servers else None
        self._scheduler = DecodeScheduler(self._ctx, self.n_batch, verbose, check_devices=check)
        self._sequences = [KVSequence(self._ctx.ctx, s, self._proto.kv_settings, cells=self.cells_per_seq,
                                      lock=self._scheduler.between_decodes) for s in range(n_seq_max)]
        self._closed = False

    def _setup(self, n_ctx: int, n_batch: int, n_ubatch: Optional[int], verbose: bool) -> None:
        proto = self._proto
        self.kv_config = proto.kv_config
        if self.kv_config is not None:
            cells = proto._ctx.n_ctx()                      # kept prompt + budget + buffer, padded
            self.n_ctx_seq = proto.n_ctx()                  # the logical context
            self.chunk_size = min(n_batch, self.kv_config.buffer)   # a request's prompt tokens per decode call
            # the decodes of all sequences plus prompt chunks (llama.cpp's default batch of 512 unless the
            # buffer is larger); the engine takes at most `buffer` tokens of a sequence per call
            buffer = self.kv_config.buffer
            per_call = min(self.n_seq_max * buffer, max(self.n_seq_max + buffer, 512))
        else:
            self.n_ctx_seq = n_ctx or proto._model.n_ctx_train()
            cells = padded_cells(self.n_ctx_seq)
            self.chunk_size = n_batch
            per_call = self.n_seq_max + n_batch
        self.cells_per_seq = cells
        self.n_batch = per_call
        params = llama_cpp.llama_context_params.from_buffer_copy(proto.context_params)
        params.n_ctx = cells * self.n_seq_max
        params.n_seq_max = self.n_seq_max
        params.kv_unified = False          # one stream per sequence: each is compressed on its own
        params.n_batch = per_call
        params.n_ubatch = min(n_ubatch or per_call, per_call)   # llama.cpp splits a call into ubatches
        kv_bytes = _native.bytes_per_cell(proto._ctx.ctx) * cells
        window = _native.window_cache(proto._ctx.ctx)
        if window is not None:   # a sliding-window model's window cache: the window and one ubatch (at most
            window_cells = padded_cells(window.n_swa + params.n_ubatch)   # the context without a budget)
            kv_bytes += window.bytes_per_cell * (window_cells if self.kv_config is not None else min(window_cells, cells))
        self._check_memory(kv_bytes * self.n_seq_max, cells)
        proto._ctx.close()
        try:
            with _native.window_cache_for_budget() if self.kv_config is not None else nullcontext():
                self._ctx = internals.LlamaContext(model=proto._model, params=params, verbose=verbose)
        except ValueError as exc:
            raise ValueError(
                f"cannot create a context of {self.n_seq_max} sequences x {cells} KV cells "
                f"({self.n_seq_max * cells} cells): not enough memory? Lower n_seq_max, kv_budget or n_ctx"
            ) from exc
        proto._ctx = self._ctx
        proto._sequence = None   # the prototype decodes nothing: each request has a sequence of its own
        proto.context_params = params
        if proto._lora_adapter is not None:
            # what llama-cpp-python did to the prototype's own context (freed above) with lora_path
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(proto._lora_adapter)
            scales = (ctypes.c_float * 1)(proto.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                raise ValueError(f"cannot apply the LoRA adapter {proto.lora_path} to the batched context")
        if self.kv_config is not None:
            try:
                _native.enable(self._ctx.ctx, self.kv_config)
                if proto._kv_calibration is not None:
                    proto._kv_calibration.apply(self._ctx.ctx)
            except _native.RkvError as exc:
                raise ValueError(f"cannot compress this model's KV cache: {exc}") from exc
        self._n_vocab = proto.n_vocab()

    def _check_memory(self, kv_bytes: int, cells: int) -> None:
        """Refuse a host-memory cache larger than the memory available: llama.cpp clears the cache
        buffer when it creates it, so an overcommitted allocation would end in the OOM killer."""
        on_host = self._proto.model_params.n_gpu_layers == 0 or not self._proto.context_params.offload_kqv
        available = available_memory()
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
        with self._sequence_freed:
            while not self._free and not self._closed:
                self._sequence_freed.wait()
            self._check_open()
            seq_id = self._free.pop(0)
            # a request without a seed draws one as llama-cpp-python's completions do on one Llama: each
            # from the last (copying the prototype's would give every request the same samples)
            self._proto._seed = random.Random(self._proto._seed).randint(0, 2**32)
            seed = self._proto._seed
        try:
            # a shallow copy (copy.copy would go through Llama's pickling, which reloads the model)
            view = _SequenceView.__new__(_SequenceView)
            view.__dict__.update(self._proto.__dict__)
            view._owner, view._next_token, view.cancelled = self, None, False
            view._sequence = self._sequences[seq_id]
            view._sampler, view.n_tokens, view._tokens_evaluated, view._seed = None, 0, 0, seed
            view._sampled = []
            view._detokenizer = self._proto._detokenizer.fork()   # what it remembers is this request's
            view._ctx = _SequenceContext(self._ctx, view._sequence, self._scheduler)
            view._n_ctx = self.n_ctx_seq
            view.input_ids = np.zeros((self.n_ctx_seq,), dtype=np.intc)
            self._scheduler.add(view)
            yield view
        finally:
            self._release(seq_id)

    def _release(self, seq_id: int) -> None:
        """Empty a finished request's stream (a compressed one starts afresh) and give it back; the
        last request to leave a closed BatchedLlama frees the model."""
        self._scheduler.remove(seq_id)
        if not self._scheduler.closed:
            try:
                self._sequences[seq_id].clear()
            except RuntimeError:
                pass   # closed meanwhile: the context goes with the model
        with self._sequence_freed:
            self._free.append(seq_id)
            self._sequence_freed.notify()
            if self._closed:
                self._free_model_if_idle()

    def create_completion(self, prompt: Union[str, List[int]], **kwargs: Any) -> Any:
        """``Llama.create_completion`` on a sequence of its own; with ``stream=True`` an iterator."""
        return self._run_request("create_completion", dict(prompt=prompt, **kwargs))

    def warn_chat_format_fallback(self) -> None:
        """``Llama.warn_chat_format_fallback``: once for all requests."""
        self._proto.warn_chat_format_fallback(stacklevel=2)

    def create_chat_completion(self, messages: List[Dict[str, Any]], **kwargs: Any) -> Any:
        """``Llama.create_chat_completion`` on a sequence of its own; with ``stream=True`` an iterator."""
        return self._run_request("create_chat_completion", dict(messages=messages, **kwargs))

    def _run_request(self, method: str, kwargs: Dict[str, Any]) -> Any:
        # a stream is lazy: its view would only see these when read, after waiting for a sequence
        with self._sequence_freed:   # the model is freed under this lock
            self._check_open()
            if kwargs.get("logit_bias"):
                check_logit_bias(kwargs["logit_bias"], self._proto.n_vocab())
            if kwargs.get("grammar") is not None:
                check_grammar(self._proto._model.vocab, kwargs["grammar"])
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
        ``(index, exception)`` once. Leaving the loop early (``break``, ``close()``, an exception)
        cancels the requests still running or waiting."""
        settings = self._settings(prompts, kwargs)
        out: "queue.Queue[Tuple[int, Any]]" = queue.Queue()
        finished = object()
        left = threading.Event()   # the reader went away

        def run(i: int, prompt: Prompt, s: Dict[str, Any]) -> None:
            try:
                if not left.is_set():
                    chunks = self._one(prompt, dict(s, stream=True))
                    try:
                        for chunk in chunks:
                            if left.is_set():
                                break
                            out.put((i, chunk))
                    finally:
                        chunks.close()   # frees the request's sequence now
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                out.put((i, exc))
            out.put((i, finished))

        with ThreadPoolExecutor(max_workers=len(prompts) or 1, thread_name_prefix="rkv-request") as pool:
            try:
                for i, (prompt, s) in enumerate(zip(prompts, settings)):
                    pool.submit(run, i, prompt, s)
                remaining = len(prompts)
                while remaining:
                    i, item = out.get()
                    if item is finished:
                        remaining -= 1
                    else:
                        yield i, item
            finally:
                left.set()

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
    # figures and lifetime
    # ------------------------------------------------------------------

    def kv_stats(self, seq_id: Optional[int] = None) -> KVStats:
        """One sequence's figures as its cache holds them (a request's ``kv_stats()`` adds the token
        counters its view keeps), or (``seq_id`` None) the sums over all sequences, with ``cells_max``
        the cells of the whole context."""
        self._check_open()
        if seq_id is None:
            return KVStats.total([self.kv_stats(s) for s in range(self.n_seq_max)], n_ctx=self.n_ctx_seq,
                                 cells_max=self.cells_per_seq * self.n_seq_max)
        return self._sequences[seq_id].stats(n_ctx=self.n_ctx_seq)

    def step_stats(self) -> StepStats:
        """Where the scheduler's time went (see ``StepStats``)."""
        return self._scheduler.stats()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this BatchedLlama is closed")

    def close(self) -> None:
        """Stop the scheduler and free the context and the model.

        Requests in flight fail at their next decode (``RuntimeError``), and those waiting for a
        sequence at once; the model is freed when the last request has left its sequence (a
        stream's iterator: when it is read to its end, closed or collected), so that none of
        them touches freed memory on its way out.
        """
        if getattr(self, "_closed", True):   # closed, or __init__ failed
            return
        with self._sequence_freed:
            if self._closed:
                return
            self._closed = True
            self._sequence_freed.notify_all()
        self._scheduler.close()
        with self._sequence_freed:
            self._free_model_if_idle()

    def _free_model_if_idle(self) -> None:
        """Once closed and every sequence is back (called with the lock held)."""
        if len(self._free) < self.n_seq_max or self._model_freed:
            return
        self._model_freed = True
        with self._scheduler.ctx_lock:
            self._ctx.close()            # ours, before the model it uses: the prototype's stack holds the model
            self._proto.close()

    def __enter__(self) -> "BatchedLlama":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
