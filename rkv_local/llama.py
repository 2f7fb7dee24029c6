"""``Llama``: llama-cpp-python's ``Llama`` with an optional budgeted KV cache."""
from __future__ import annotations

import ctypes
import inspect
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Generator, Optional, Sequence

import llama_cpp
import numpy as np
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_tokenizer import LlamaTokenizer

from . import _native, calibration, rpc
from ._native import CompressionConfig
from .detokenize import Detokenizer, PieceTable
from .reasoning import REASONING_FORMATS, ThinkingWatch, split_message, split_stream, thinking_open_in_prompt
from .sampling import check_grammar, check_logit_bias
from .sequence import KVSequence, KVStats
from .settings import KVSettings

# the physical cache is rounded to this: llama.cpp attends to n_kv = PAD(used, 256) cells anyway
CACHE_PAD = 256


def padded_cells(cells: int) -> int:
    """``cells`` rounded up to a multiple of CACHE_PAD: the physical cache that holds them."""
    return -(-cells // CACHE_PAD) * CACHE_PAD

_CREATE_COMPLETION = inspect.signature(llama_cpp.Llama.create_completion)
_GENERATE = inspect.signature(llama_cpp.Llama.generate)


def n_ctx_train(model_path: str | os.PathLike[str], verbose: bool = True) -> int:
    """The model's training context from the GGUF metadata, without loading weights (0 if unknown)."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True   # reads the metadata; hparams such as n_ctx_train stay unset
    with suppress_stdout_stderr(disable=verbose):
        model = llama_cpp.llama_model_load_from_file(os.fspath(model_path).encode(), params)
    if not model:
        raise ValueError(f"Failed to load model from file: {os.fspath(model_path)}")
    try:
        value = ctypes.create_string_buffer(128)
        llama_cpp.llama_model_meta_val_str(model, b"general.architecture", value, len(value))
        key = f"{value.value.decode()}.context_length".encode()
        if llama_cpp.llama_model_meta_val_str(model, key, value, len(value)) < 0:
            return 0
        return int(value.value)
    finally:
        llama_cpp.llama_model_free(model)


def model_meta(model: Any, key: str) -> Optional[str]:
    """A GGUF metadata value of a loaded model ("{arch}" in ``key`` names its architecture); None if absent."""
    value = ctypes.create_string_buffer(256)
    if "{arch}" in key:
        llama_cpp.llama_model_meta_val_str(model, b"general.architecture", value, len(value))
        key = key.replace("{arch}", value.value.decode())
    if llama_cpp.llama_model_meta_val_str(model, key.encode(), value, len(value)) < 0:
        return None
    return value.value.decode()


def head_shape(model: Any) -> tuple[int, int]:
    """(query heads, head size) of a loaded model: the key length where the model states one (Gemma 3's
    heads are not n_embd / n_head wide)."""
    n_head = llama_cpp.llama_model_n_head(model)
    key_length = model_meta(model, "{arch}.attention.key_length")
    return n_head, int(key_length) if key_length else llama_cpp.llama_model_n_embd(model) // n_head


class ComposableProcessors(llama_cpp.LogitsProcessorList):
    """A logits processor list whose ``extend`` returns the list (llama-cpp-python composes with it)."""

    def extend(self, processors: Any) -> "ComposableProcessors":  # type: ignore[override]
        super().extend(processors)
        return self


@dataclass
class ChatFormatFallback:
    """A model without a chat template, whose chats go through llama-cpp-python's fallback format: said
    once per model (``BatchedLlama``'s requests share it), as llama.cpp's server names its fallback."""

    model: str
    chat_format: str
    warned: bool = False

    @classmethod
    def of(cls, llm: llama_cpp.Llama, model_path: str, chat_format: Optional[str]) -> Optional["ChatFormatFallback"]:
        chose = chat_format is not None or llm.chat_handler is not None
        if chose or any(key.startswith("tokenizer.chat_template") for key in llm.metadata):
            return None
        return cls(os.path.basename(model_path), llm.chat_format)

    def warn(self, stacklevel: int) -> None:
        if self.warned:
            return
        self.warned = True
        warnings.warn(
            f"{self.model} has no chat template: chat messages are formatted as {self.chat_format!r}, "
            f"llama-cpp-python's fallback, which the model was not trained on (a base model may answer nothing); "
            f"choose a chat_format, or complete plain text with create_completion",
            UserWarning, stacklevel=stacklevel + 1)


class _Closed:
    """Stands for the model, context and batch of a closed ``Llama``."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("this Llama was closed; create a new one")

    def close(self) -> None:
        pass


_LLAMA_CPP_PARAMETERS = frozenset(inspect.signature(llama_cpp.Llama.__init__).parameters)


def _endpoints(servers: Optional[Sequence[str] | str]) -> list[str]:
    """``rpc_servers`` as a list; a comma-separated string as llama.cpp's ``--rpc`` takes it."""
    if servers is None:
        return []
    if isinstance(servers, str):
        servers = servers.split(",")
    return [s.strip() for s in servers if s.strip()]


def kv_settings_from(kwargs: dict) -> KVSettings:
    """The ``kv_*`` arguments taken out of ``kwargs``: llama-cpp-python's ``Llama`` swallows unknown
    keyword arguments, so a misspelled ``kv_budgt=64`` is refused here rather than run without a budget."""
    return KVSettings.from_kwargs(kwargs, known=_LLAMA_CPP_PARAMETERS)   # kv_overrides is llama-cpp-python's


class Llama(llama_cpp.Llama):
    """Drop-in for ``llama_cpp.Llama``.

    Without ``kv_budget`` it is llama-cpp-python's ``Llama`` except for ``detokenize``, which the
    completion loop calls with the whole completion at every token: it answers at the cost of the new
    tokens (``rkv_local.detokenize``), with llama-cpp-python's bytes, except that pieces longer than
    32 bytes are kept instead of dropped. With a budget, each
    layer and KV head keeps at most ``kv_budget`` tokens (plus ``kv_buffer`` decoded between two
    compressions): the physical cache holds ``kv_budget + kv_buffer`` cells while positions,
    ``max_tokens`` and the context run up to the logical ``n_ctx`` (default: the model's
    training context).

    A prompt that extends what the cache holds (the next turn of a chat) only evaluates the new
    tokens; one that departs from it inside the compressed part is evaluated from scratch, as a
    fresh instance would (``kv_stats().prompt_tokens_evaluated`` tells which happened).

    ``rpc_servers`` (``["host:port", ...]`` or llama.cpp's comma-separated string) puts layers, and
    their KV caches, on llama.cpp ``rpc-server`` processes (``rkv_local.rpc``): every layer unless
    ``n_gpu_layers`` says otherwise, spread by ``tensor_split``; each layer's cache is compressed
    where it lives. A server that does not answer is a ``ConnectionError`` (``RpcServerError``) at
    construction; one that goes away is one at the next decode, and at every use after it.
    """

    _owner_name = "Llama"   # in messages

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        rpc_servers: Optional[Sequence[str] | str] = None,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: llama-cpp-python's ``Llama`` arguments and the ``kv_*`` settings of ``KVSettings``
        (``kv_budget``, ``kv_buffer``, ``kv_method``, ...)."""
        settings = kv_settings_from(kwargs)
        model_path = os.fspath(model_path)  # llama-cpp-python takes str only
        if not os.path.exists(model_path):  # llama-cpp-python's message, before the metadata is read
            raise ValueError(f"Model path does not exist: {model_path}")
        self.kv_settings = settings
        self._kv_config: Optional[CompressionConfig] = None
        self._n_ctx_logical: Optional[int] = None
        self._tokens_evaluated = 0
        self._prompt_tokens = 0
        self._prompt_tokens_evaluated = 0
        self._prompt_pending = False
        self._detokenizer: Optional[Detokenizer] = None
        self._thinking: Optional[ThinkingWatch] = None
        self._kv_calibration: Optional[calibration.Calibration] = None
        self._rpc_servers = _endpoints(rpc_servers)
        self._devices: Optional[list[int]] = None
        if self._rpc_servers:
            self._devices = rpc.devices_for(self._rpc_servers)
            kwargs.setdefault("n_gpu_layers", -1)   # what naming the servers asks for: the layers go there
        # a vocabulary-only Llama (tokenizing) has no cache: a budget in shared settings is moot
        if not settings.compressed or kwargs.get("vocab_only"):
            self.kv_settings = KVSettings()
            self._load(model_path, **kwargs)
            self._detokenizer = Detokenizer(PieceTable(self._model))
            return

        config = settings.engine_config()
        if kwargs.get("logits_all"):
            raise ValueError("logits_all (and so logprobs) is not supported with a kv_budget: "
                             "a logical context of logits would not fit the budget")
        if kwargs.get("draft_model") is not None:
            raise ValueError("draft_model (speculative decoding) is not supported with a kv_budget: it needs "
                             "logits of every position and truncates the cache where it may be compressed")
        if kwargs.get("embedding"):
            raise ValueError("embedding=True is not supported with a kv_budget: compression is for generation; "
                             "create the embedding model without kv_budget")
        for name in ("n_batch", "n_ubatch"):
            value = kwargs.get(name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        n_ctx_logical = kwargs.pop("n_ctx", None) or 0
        if n_ctx_logical < 0:
            raise ValueError(f"n_ctx must be positive (or 0: the model's training context), got {n_ctx_logical}")
        # refused before the physical cache of budget + buffer cells is allocated (a smaller logical
        # n_ctx is fine: such a short run is never compressed)
        if config.budget + config.buffer > CACHE_PAD:
            n_train = n_ctx_train(model_path, kwargs.get("verbose", True))
            if n_train and config.budget + config.buffer > n_train:
                raise ValueError(
                    f"kv_budget + kv_buffer ({config.budget} + {config.buffer}) exceeds the model's training "
                    f"context ({n_train} tokens): the cache would never be compressed; use a smaller budget, or "
                    f"no kv_budget for a full cache")
        # llama.cpp's default sizes a sliding-window model's window cache like the full one; with a budget
        # the window cache keeps only what the window needs (n_swa + n_ubatch cells, padded), as
        # llama.cpp's own server does. A truncation past what it holds re-evaluates the prompt.
        kwargs.setdefault("swa_full", False)
        # with a budget one decode call carries at most kv_buffer tokens (the engine compresses between
        # calls): a larger n_batch (llama-cpp-python's default is 512) evaluates a prompt in such calls
        n_batch = min(kwargs.pop("n_batch", None) or config.buffer, config.buffer)
        n_ubatch = min(kwargs.pop("n_ubatch", None) or n_batch, n_batch)
        # the kept prompt's cells come on top of the budget's
        physical = padded_cells(settings.kv_keep_prompt + config.budget + config.buffer)
        # a sliding-window model's window cache holds its window whatever the budget (llama.cpp caps it at n_ctx)
        with _native.window_cache_for_budget():
            self._load(model_path, n_ctx=physical, n_batch=n_batch, n_ubatch=n_ubatch, **kwargs)
        try:
            _native.enable(self._ctx.ctx, config)
            if config.method == "triattention":
                device = {k: kwargs[k] for k in ("n_gpu_layers", "n_threads", "n_threads_batch") if k in kwargs}
                self._kv_calibration, path = calibration.resolve(model_path, settings.kv_calibration, **device)
                self.kv_settings = settings = settings.with_(kv_calibration=path)   # the file it used
                self._sequence = replace(self._sequence, settings=settings)
                self._kv_calibration.apply(self._ctx.ctx)
        except (_native.RkvError, ValueError, FileNotFoundError) as exc:
            self.close()
            raise ValueError(f"cannot compress this model's KV cache: {exc}") from exc
        self._kv_config = config
        if settings.kv_compress == "think":
            self._thinking = ThinkingWatch.for_model(self, settings.kv_think_end)
        self._detokenizer = Detokenizer(PieceTable(self._model))
        self._n_ctx_logical = int(n_ctx_logical) or self._model.n_ctx_train()
        # llama-cpp-python sizes these by its n_ctx: with a budget, positions (and so input_ids) run
        # up to the logical context. Logits are not kept per position (no logits_all): `scores`
        # keeps the n_batch rows it was given.
        self._n_ctx = self._n_ctx_logical
        self.input_ids = np.zeros((self._n_ctx_logical,), dtype=np.intc)

    def _load(self, model_path: str, **kwargs: Any) -> None:
        """llama-cpp-python's constructor, the model offloaded to the RPC servers' devices if any."""
        if self._devices is None:
            super().__init__(model_path, **kwargs)
        else:
            with rpc.using_devices(self._devices):
                super().__init__(model_path, **kwargs)
        self._sequence = KVSequence(self._ctx.ctx, 0, self.kv_settings, cells=super().n_ctx())
        self._chat_fallback = ChatFormatFallback.of(self, model_path, kwargs.get("chat_format"))

    def warn_chat_format_fallback(self, stacklevel: int = 1) -> None:
        """Warn (once) when chats go through llama-cpp-python's fallback format: the model has no chat
        template and no ``chat_format`` or ``chat_handler`` was chosen. ``create_chat_completion`` calls it."""
        fallback = self._chat_fallback
        if fallback is not None and self.chat_handler is None and self.chat_format == fallback.chat_format:
            fallback.warn(stacklevel + 1)

    def _check_rpc_servers(self) -> None:
        gone = rpc.failed_servers(self._rpc_servers)
        if gone:
            raise rpc.RpcServerError(
                f"rpc server {', '.join(gone)} went away: this Llama's layers there are lost; close it and "
                f"create a new one once the server runs again")

    def close(self) -> None:
        # settings refused before the parent's __init__ leave nothing to close
        if hasattr(self, "_stack"):
            super().close()
            # llama-cpp-python keeps pointers to the freed model and context: a later call would
            # crash in llama.cpp, so every use now raises instead
            self._model = self._ctx = self._batch = self.tokenizer_ = self._sequence = _Closed()

    @property
    def kv_config(self) -> Optional[CompressionConfig]:
        return self._kv_config

    def n_ctx(self) -> int:
        """The logical context: with a budget, longer than the physical cache."""
        if getattr(self, "_n_ctx_logical", None):
            return self._n_ctx_logical
        return super().n_ctx()

    def detokenize(self, tokens: list[int], prev_tokens: Optional[list[int]] = None, special: bool = False) -> bytes:
        # llama-cpp-python's completion loop detokenizes the whole completion at every token: ours costs
        # the new tokens only (rkv_local.detokenize), with the same bytes. Its LlamaTokenizer ignores
        # prev_tokens; another tokenizer (tokenizer=...) is asked as before. The loop passes prev_tokens:
        # its bytes decode past invalid UTF-8 (CompletionBytes), so a stream goes on after it.
        detokenizer = self.__dict__.get("_detokenizer")
        if detokenizer is None or type(self.tokenizer_) is not LlamaTokenizer:
            return super().detokenize(tokens, prev_tokens=prev_tokens, special=special)
        return detokenizer(tokens, special, completion=prev_tokens is not None)

    # ------------------------------------------------------------------
    # evaluation: counters, and truncations the compressed cache refuses
    # ------------------------------------------------------------------

    def _count_prompt(self, tokens: Sequence[int]) -> None:
        """The first evaluation of a generate() call is its prompt (what the cache did not hold)."""
        if self._prompt_pending:
            self._prompt_pending = False
            self._prompt_tokens_evaluated = len(tokens)

    def eval(self, tokens: Sequence[int]) -> None:
        self._count_prompt(tokens)
        if self._kv_config is not None and len(tokens) > 0:
            if self.n_tokens + len(tokens) > self._n_ctx_logical:
                raise ValueError(
                    f"evaluating {len(tokens)} tokens after {self.n_tokens} would exceed the logical context "
                    f"(n_ctx = {self._n_ctx_logical})"
                )
            # llama-cpp-python truncates the cache to n_tokens first and ignores the answer: a compressed
            # cache refuses a truncation at or below the positions its last compression scored.
            if not self._sequence.truncate(self.n_tokens):
                raise RuntimeError(
                    f"cannot evaluate from position {self.n_tokens}: the KV cache was compressed past it and "
                    f"cannot be truncated there; call reset() and evaluate the whole prompt"
                )
        before = self.n_tokens
        if self._rpc_servers:
            self._check_rpc_servers()
        try:
            super().eval(tokens)
            if self._rpc_servers:   # a server that went away answered zeros: these logits are not the model's
                self._check_rpc_servers()
        except RuntimeError as exc:
            error = self._compression_error(exc)
            if error is not None:
                raise error from exc
            raise
        finally:
            self._tokens_evaluated += max(self.n_tokens - before, 0)

    def _compression_error(self, exc: BaseException) -> Optional[RuntimeError]:
        """The error of a decode that failed because the sequence's compression did, saying why (None
        when it did not); when the failure cleared the sequence, this Llama forgets its tokens too, and
        the next call evaluates its prompt again."""
        why = self._sequence.failure()
        if not why:
            return None
        self._forget_cleared_tokens()
        error = RuntimeError(f"KV compression failed: {why}")
        error.__cause__ = exc
        return error

    def _forget_cleared_tokens(self) -> None:
        """After a compression that failed while moving K/V the engine cleared the sequence: so does this Llama."""
        self.n_tokens = min(self.n_tokens, self._sequence.tokens_held())

    def generate(
        self, tokens: Sequence[int], *args: Any, **kwargs: Any
    ) -> Generator[int, Optional[Sequence[int]], None]:
        tokens = list(tokens)
        grammar = _GENERATE.bind(self, tokens, *args, **kwargs).arguments.get("grammar")
        if grammar is not None:
            check_grammar(self._model.vocab, grammar)
        self._prompt_tokens = len(tokens)
        self._prompt_tokens_evaluated = 0
        self._prompt_pending = True
        if self._kv_config is None:
            return (yield from super().generate(tokens, *args, **kwargs))
        # set before llama-cpp-python truncates the cache to the part of the prompt it holds: a kept
        # prompt's cells then stay, and only the new tokens are evaluated
        self._sequence.set_kept_prompt(min(len(tokens), self.kv_settings.kv_keep_prompt))
        self._sequence.set_paused(False)   # each turn's thinking is compressed again
        inner = super().generate(tokens, *args, **kwargs)
        if self._thinking is None:
            return (yield from inner)
        watch = self._thinking.start()
        sent: Optional[Sequence[int]] = None
        while True:
            try:
                token = inner.send(sent)
            except StopIteration as stop:
                return stop.value
            if watch(token):
                # the thinking ended: bring it to the budget now, so the answer has the cells
                # beyond it, and evict nothing more while they last
                self._sequence.compress()
                self._sequence.set_paused(True)
            sent = yield token

    @property
    def kv_keep_prompt(self) -> int:
        """Cells set aside for the kept prompt (``kv_keep_prompt``); 0 without a budget."""
        return self.kv_settings.kv_keep_prompt

    def reset(self) -> None:
        # llama-cpp-python's reset for this sequence only (its own clears the whole memory of a recurrent
        # model, every request's in a BatchedLlama), and now (it leaves a KV cache to the next eval):
        # statistics and the engine's state start afresh, as in a new instance
        self.n_tokens = 0
        self._requires_eval = True
        self._sequence.clear()
        if self._kv_config is not None and not self._prompt_pending:
            # not generate()'s own reset, before its prompt: nothing kept
            self._sequence.set_kept_prompt(0)
            self._sequence.set_paused(False)

    # ------------------------------------------------------------------
    # completions: refusals with a budget, sampling settings llama.cpp would crash or ignore on
    # ------------------------------------------------------------------

    def create_completion(self, prompt: Any, *args: Any, **kwargs: Any) -> Any:
        bound = _CREATE_COMPLETION.bind(self, prompt, *args, **kwargs)
        if self._kv_config is not None and bound.arguments.get("logprobs") is not None:
            raise ValueError(
                "logprobs are not supported with a kv_budget: they need the logits of every position "
                "(logits_all), which a budgeted cache does not keep; create the Llama without kv_budget "
                "and with logits_all=True for logprobs"
            )
        # refused here, not at the first sample: a stream would otherwise fail after its first chunk
        if bound.arguments.get("logit_bias"):
            check_logit_bias(bound.arguments["logit_bias"], self.n_vocab())
        if bound.arguments.get("grammar") is not None:
            check_grammar(self._model.vocab, bound.arguments["grammar"])
        processors = bound.arguments.get("logits_processor")
        if bound.arguments.get("logit_bias") and processors is not None:
            # llama-cpp-python adds its logit_bias processor with `processors = processors.extend(...)`:
            # a list's extend returns None, and both would be lost
            bound.arguments["logits_processor"] = ComposableProcessors(processors)
            return super().create_completion(*bound.args[1:], **bound.kwargs)
        return super().create_completion(prompt, *args, **kwargs)

    def create_chat_completion(self, messages: Any, *args: Any, reasoning_format: str = "none", **kwargs: Any) -> Any:
        """llama-cpp-python's ``create_chat_completion``; ``reasoning_format="deepseek"`` puts a reasoning
        model's thinking in ``message.reasoning_content`` (``delta.reasoning_content`` in a stream)
        and the rest in ``content``, as llama.cpp's server does with ``--reasoning-format deepseek``."""
        if reasoning_format not in REASONING_FORMATS:
            raise ValueError(f"unknown reasoning_format {reasoning_format!r}; choose one of {', '.join(REASONING_FORMATS)}")
        self.warn_chat_format_fallback(stacklevel=2)
        response = super().create_chat_completion(messages, *args, **kwargs)
        if reasoning_format == "none":
            return response
        thinking = thinking_open_in_prompt(self, messages)
        if isinstance(response, dict):
            return split_message(response, thinking)
        return split_stream(response, thinking)

    def _create_completion(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return (yield from super()._create_completion(*args, **kwargs))
        except ValueError as exc:
            # llama-cpp-python names the physical context (llama_n_ctx) in this message
            message = str(exc)
            if self._kv_config is not None and message.startswith("Requested tokens (") \
                    and "exceed context window" in message:
                n = message[len("Requested tokens ("):].split(")", 1)[0]
                raise ValueError(
                    f"Requested tokens ({n}) exceed the context window of {self._n_ctx_logical} tokens "
                    f"(the logical n_ctx; the KV cache itself holds kv_budget + kv_buffer = "
                    f"{self._kv_config.budget + self._kv_config.buffer} cells)"
                ) from None
            raise

    # ------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------

    def save_state(self) -> llama_cpp.LlamaState:
        state = super().save_state()
        if self._kv_config is not None:
            state.kv_config = self._kv_config  # checked by load_state
        return state

    def load_state(self, state: llama_cpp.LlamaState) -> None:
        cfg = self._kv_config
        saved = getattr(state, "kv_config", None)
        if cfg is None:
            if saved is not None:
                raise ValueError(f"this state was saved with kv_budget={saved.budget}; this Llama has no kv_budget")
            super().load_state(state)
            return
        if saved is not None and (saved.budget, saved.buffer, saved.window) != (cfg.budget, cfg.buffer, cfg.window):
            raise ValueError(
                f"this state was saved with kv_budget={saved.budget}, kv_buffer={saved.buffer}, "
                f"kv_window={saved.window}; this Llama has kv_budget={cfg.budget}, kv_buffer={cfg.buffer}, "
                f"kv_window={cfg.window}"
            )
        if saved is not None and saved.method != cfg.method:
            # the cache would go on under another method than the one that chose what it holds
            raise ValueError(f"this state was saved with kv_method={saved.method!r}; this Llama has "
                             f"kv_method={cfg.method!r}")
        try:
            if len(state.llama_state) != state.llama_state_size or state.llama_state_size == 0:
                # llama.cpp reads zero bytes of an empty state and reports success
                raise ValueError(f"the state holds {len(state.llama_state)} bytes of llama.cpp state for "
                                 f"{state.llama_state_size} announced")
            super().load_state(state)
            held = self._sequence.tokens_held()
            if held != self.n_tokens:
                raise ValueError(f"the restored cache holds {held} tokens, the state's token list {self.n_tokens}")
        except (RuntimeError, ValueError) as exc:
            # llama-cpp-python may have taken the state's tokens already: start from an empty cache
            # instead of one half restored
            self.reset()
            raise RuntimeError(
                "failed to restore the state: it must come from a Llama of the same model with the same "
                "kv_budget, kv_buffer and kv_window; this Llama was reset"
            ) from exc
        if len(self.input_ids) < self._n_ctx_logical:
            ids = np.zeros((self._n_ctx_logical,), dtype=np.intc)
            ids[: len(self.input_ids)] = self.input_ids
            self.input_ids = ids

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if self.kv_settings.compressed:
            state.update(n_ctx=self._n_ctx_logical, **self.kv_settings.to_kwargs())
        return state

    # ------------------------------------------------------------------
    # engine figures
    # ------------------------------------------------------------------

    def kv_stats(self) -> KVStats:
        return self._sequence.stats(n_tokens=self.n_tokens, n_ctx=self.n_ctx(), **self.token_counters())

    def token_counters(self) -> dict[str, int]:
        """KVStats' counters this Llama keeps: tokens decoded, and of the last prompt, how many."""
        return dict(tokens_evaluated=self._tokens_evaluated, prompt_tokens=self._prompt_tokens,
                    prompt_tokens_evaluated=self._prompt_tokens_evaluated)

    def compressed_layers(self) -> list[int]:
        """The layers whose cache the budget bounds: every attention layer, or only the full-attention
        ones of a sliding-window model (gpt-oss, Gemma 3), whose window layers keep llama.cpp's window.
        Empty without a budget."""
        if self._kv_config is None:
            return []
        return _native.compressed_layers(self._ctx.ctx)

    def kept_positions(self, layer: int, head: int) -> np.ndarray:
        """Positions of the tokens that ``layer``'s KV ``head`` holds, oldest first (a compressed layer:
        see ``compressed_layers``)."""
        return self._sequence.kept_positions(layer, head, self.n_tokens)

    def compress_now(self) -> bool:
        """Compress the cache to the budget now; False if it holds no more than the budget.

        The compression scores every token held, the newest included, so the cache can no longer be
        truncated to re-evaluate that token: a state saved right after this call, before another
        token is evaluated, is evaluated from scratch when ``generate`` continues it after a restore
        (llama.cpp's state keeps no logits, so llama-cpp-python re-evaluates the last token)."""
        if self._kv_config is None:
            raise RuntimeError(f"this {self._owner_name} has no kv_budget")
        try:
            return self._sequence.compress()
        except _native.RkvError:
            self._forget_cleared_tokens()
            raise
