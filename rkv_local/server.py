"""``rkv-local serve``: an OpenAI-compatible HTTP server on one ``BatchedLlama``.

Every request runs on a thread of its own: it waits for a free sequence of the ``BatchedLlama``
(so requests beyond ``n_seq_max`` queue), then runs llama-cpp-python's ``create_completion`` /
``create_chat_completion`` on that sequence's view; the batch scheduler decodes all running
requests together. The event loop only moves results: a thread hands its chunks to the loop,
which sends them as server-sent events (``data: {...}``, then ``data: [DONE]``).

* A client that goes away cancels its request: the view is marked cancelled, its next decode
  step raises ``RequestCancelled``, and the sequence goes back to the scheduler, which frees it.
* Errors before the first piece of an answer (a prompt longer than the context, a bad setting)
  are HTTP errors with OpenAI's error JSON (``{"error": {"message", "type", "param", "code"}}``);
  an error after a stream started is sent as an ``error`` event, then ``[DONE]``.
* Request and response shapes are llama-cpp-python's (``llama_cpp.server.types``); fields a
  sequence view cannot honour (``n`` > 1, ``best_of`` > 1, ``logprobs``) are refused with a 400.
  Unknown fields are ignored, as OpenAI-compatible servers (llama-cpp-python's among them) do:
  clients send fields of newer API versions. The one such field that limits an answer, chat's
  ``max_completion_tokens``, is honoured as ``max_tokens``.
* ``max_tokens`` beyond the logical context (10**9, say) is cut to what the context has left, and
  the answer ends there with finish_reason "length"; 0 or null runs up to the context.

Unlike llama-cpp-python's own server app there is no global lock: concurrent requests run
together, and a new request never interrupts a running stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import re
import threading
import time
from typing import Any, AsyncIterator, Dict, Iterator, List, Literal, Optional, Set, Tuple, Union

from .requirements import requirements

__all__ = ["SERVER_EXTRAS", "ServerExtrasMissing", "begin_shutdown", "create_app", "drain"]

# pyproject.toml's `server` extra: what llama-cpp-python 0.3.36 declares for its own, and prometheus_client
SERVER_EXTRAS = tuple(requirements("server"))


class ServerExtrasMissing(ImportError):
    """The packages the server needs (FastAPI, sse-starlette, uvicorn) are not installed."""


try:
    import anyio
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from pydantic import BaseModel, ConfigDict, Field
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ServerExtrasMissing(
        f"`rkv-local serve` needs the server packages ({exc}); install them with "
        f"pip install 'rkv-local[server]'  (or: pip install {' '.join(repr(r) for r in SERVER_EXTRAS)})"
    ) from exc

import llama_cpp

from .batched import BatchedLlama, RequestCancelled
from .sampling import check_grammar, check_logit_bias

# how often a request that waits (for a sequence, or for its answer) checks that its client is still there
DISCONNECT_POLL_S = 0.25
# a stopping server answers new requests 503 with this Retry-After (seconds)
RETRY_AFTER_S = 5


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry on another instance or after its restart",
                    type="server_error", code="server_shutting_down")


def _api_error(exc: BaseException) -> APIError:
    """What a failure inside a request becomes: a bad request (ValueError) or a server error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        message = str(exc) or repr(exc)
        code = "context_length_exceeded" if re.search(r"exceeds? (the )?context window", message) else None
        return APIError(400, message, code=code)
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error")


class _ClientGone(Exception):
    """The client closed the connection while its request waited."""


class _ShutdownDeadline(Exception):
    """The server is stopping and the request's time to finish has run out."""


class _Job:
    """One request on a thread of its own: wait for a sequence, run the completion on its view,
    and hand ``("result" | "chunk" | "error" | "end", value)`` items to the event loop."""

    def __init__(self, served: "_Served", method: str, kwargs: Dict[str, Any], include_usage: bool = False) -> None:
        self._served = served
        self._method = method
        self._kwargs = kwargs
        self._stream = bool(kwargs.get("stream"))
        self._include_usage = include_usage
        self._loop = asyncio.get_running_loop()
        self.items: "asyncio.Queue[Tuple[str, Any]]" = asyncio.Queue()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._view: Any = None
        self.seq_id: Optional[int] = None
        self.thread = threading.Thread(target=self._run, name="rkv-request", daemon=True)

    def start(self) -> None:
        self._served.add(self)
        self.thread.start()

    def cancel(self) -> None:
        """Stop the request: a waiting one never starts, a running one stops at its next decode."""
        with self._lock:
            if not self._cancelled.is_set():
                self._served.cancelled()
            self._cancelled.set()
            if self._view is not None:
                self._view.cancelled = True

    def _put(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        try:
            with self._served.llm.sequence() as view:
                started = time.monotonic()
                with self._lock:
                    self._view, self.seq_id = view, view.seq_id
                    view.cancelled = self._cancelled.is_set()
                if view.cancelled:
                    return
                try:
                    result = getattr(view, self._method)(**self._served.prepare(view, self._kwargs))
                    if not self._stream:
                        self._put("result", result)
                        return
                    chunk = None
                    try:
                        for chunk in result:
                            self._put("chunk", chunk)
                            if self._cancelled.is_set():
                                return
                    finally:
                        view.cancelled = True  # whatever is left of the generators may not decode any more
                        result.close()
                    if self._include_usage and chunk is not None:
                        # OpenAI's stream_options.include_usage: a last chunk with the usage and no choice
                        self._put("chunk", dict({k: v for k, v in chunk.items() if k != "choices"},
                                                choices=[], usage=view.usage()))
                finally:
                    self._served.finished(view, time.monotonic() - started)
        except RequestCancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the client
            self._put("error", exc)
        finally:
            self._served.remove(self)
            self._put("end", None)


class _Metrics:
    """What ``GET /metrics`` shows, in Prometheus' text format: counters kept as requests come and go,
    and the gauges of the queue and of each sequence's cache read when scraped. A registry of the
    app's own, so that several apps in one process do not mix their figures."""

    def __init__(self, served: "_Served") -> None:
        self.registry = CollectorRegistry()
        self._served = served
        self.requests = Counter("rkv_requests", "Requests received, by endpoint", ["endpoint"],
                                registry=self.registry)
        self.rejected = Counter("rkv_requests_rejected", "Requests refused with a 503, by reason",
                                ["reason"], registry=self.registry)
        self.finished_requests = Counter("rkv_requests_finished", "Requests that ran on a sequence and left it",
                                         registry=self.registry)
        self.prompt_tokens = Counter("rkv_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("rkv_completion_tokens", "Tokens written by finished requests",
                                         registry=self.registry)
        self.tokens_per_second = Gauge("rkv_completion_tokens_per_second",
                                       "Tokens written per second by the last finished request, its prompt "
                                       "included in the time (rate(rkv_completion_tokens_total) for the server)",
                                       registry=self.registry)
        self.registry.register(self)

    def finished(self, usage: Dict[str, int], seconds: float) -> None:
        self.finished_requests.inc()
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.completion_tokens.inc(usage["completion_tokens"])
        if seconds > 0:
            self.tokens_per_second.set(usage["completion_tokens"] / seconds)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges read at scrape time (prometheus_client's custom-collector protocol)."""
        served, llm = self._served, self._served.llm
        running, waiting = served.counts()
        yield GaugeMetricFamily("rkv_requests_running", "Requests decoding on a sequence", value=len(running))
        yield GaugeMetricFamily("rkv_requests_waiting", "Requests waiting for a free sequence", value=waiting)
        if llm._closed:
            return
        figures = {
            "rkv_sequence_cells": ("KV cells the sequence holds now (per layer and KV head)", "cells_used"),
            "rkv_sequence_tokens": ("Logical length of the sequence (its positions)", "n_tokens"),
            "rkv_sequence_compressions": ("Compressions of the sequence's current request", "compressions"),
            "rkv_sequence_kv_bytes": ("KV-cache bytes the sequence holds now", "kv_bytes_used"),
            "rkv_sequence_window_kv_bytes": ("Sliding-window models: bytes the sequence's window cache holds now "
                                             "(not in rkv_sequence_kv_bytes)", "kv_bytes_window"),
        }
        families = {name: GaugeMetricFamily(name, doc, labels=["seq_id"]) for name, (doc, _) in figures.items()}
        for seq_id in range(llm.n_seq_max):
            stats = llm.kv_stats(seq_id)
            for name, (_, field) in figures.items():
                families[name].add_metric([str(seq_id)], getattr(stats, field))
        yield from families.values()


class _Served:
    """The model, its name and the requests in flight."""

    def __init__(self, llm: BatchedLlama, model_alias: str, api_key: Optional[str],
                 shutdown_timeout_s: float = 30.0, max_queue: Optional[int] = None) -> None:
        self.llm = llm
        self.shutdown_timeout_s = shutdown_timeout_s
        self.max_queue = max_queue
        self.model_alias = model_alias
        self.api_key = api_key
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._jobs: Set[_Job] = set()
        self.n_finished = 0
        self.n_waited = 0      # requests that arrived with every sequence taken
        self.n_cancelled = 0   # requests stopped before their end (client gone, shutdown)
        self.last_finished: Optional[Dict[str, Any]] = None   # kv_stats of the last request, as it ended
        self.stopping = False
        self.deadline = float("inf")   # time.monotonic() by which a stopping server ends what still runs
        self.metrics = _Metrics(self)

    def begin_shutdown(self) -> None:
        """Take no new request; let the running ones finish for ``shutdown_timeout_s`` seconds."""
        if not self.stopping:
            self.stopping, self.deadline = True, time.monotonic() + self.shutdown_timeout_s

    def finished(self, view: Any, seconds: float) -> None:
        # figures only: the request itself is done, whatever fails here
        try:
            stats = dict(seq_id=view.seq_id, **dataclasses.asdict(view.kv_stats()))
        except Exception:  # noqa: BLE001
            stats = None
        try:
            self.metrics.finished(view.usage(), seconds)
        except Exception:  # noqa: BLE001
            pass
        with self._lock:
            self.n_finished += 1
            self.last_finished = stats

    def cancelled(self) -> None:
        with self._lock:
            self.n_cancelled += 1

    def add(self, job: _Job) -> None:
        """Take the request, or refuse it with a 503 when ``max_queue`` requests already wait."""
        with self._lock:
            if self.max_queue is not None and len(self._jobs) >= self.llm.n_seq_max + self.max_queue:
                self.metrics.rejected.labels(reason="queue_full").inc()
                raise APIError(503, f"the server is busy: {self.max_queue} request(s) already wait for one of its "
                                    f"{self.llm.n_seq_max} sequence(s); retry later",
                               type="server_error", code="queue_full")
            self.n_waited += len(self._jobs) >= self.llm.n_seq_max
            self._jobs.add(job)

    def remove(self, job: _Job) -> None:
        with self._lock:
            self._jobs.discard(job)

    def counts(self) -> Tuple[List[int], int]:
        """(sequences of the running requests, number of requests waiting for a sequence)."""
        with self._lock:
            running = sorted(j.seq_id for j in self._jobs if j.seq_id is not None)
            return running, len(self._jobs) - len(running)

    def drain(self, timeout_s: float) -> bool:
        """Cancel every request and wait for their threads; True once none is left."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            job.thread.join(max(0.0, deadline - time.monotonic()))
        return not any(job.thread.is_alive() for job in jobs)

    def prepare(self, view: Any, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """The request's arguments for the view (what llama-cpp-python's app does per request)."""
        kwargs = dict(kwargs)
        min_tokens = kwargs.pop("min_tokens", 0) or 0
        bias_type = kwargs.pop("logit_bias_type", None)
        if kwargs.get("logit_bias") and bias_type == "tokens":
            bias: Dict[str, float] = {}
            for text, score in kwargs["logit_bias"].items():
                for token in view.tokenize(text.encode("utf-8"), add_bos=False, special=True):
                    bias[str(token)] = score
            kwargs["logit_bias"] = bias
        if kwargs.get("logit_bias"):
            _check_token_ids(kwargs["logit_bias"], view.n_vocab())
        if kwargs.get("grammar") is not None:
            kwargs["grammar"] = _parse_grammar(view, kwargs["grammar"])
        if min_tokens > 0:
            kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
                [llama_cpp.MinTokensLogitsProcessor(min_tokens, view.token_eos())])
        kwargs["model"] = self.model_alias
        return kwargs


def _check_token_ids(logit_bias: Dict[str, float], n_vocab: int) -> None:
    """``sampling.check_logit_bias`` as a 400 naming the parameter."""
    try:
        check_logit_bias(logit_bias, n_vocab)
    except ValueError as exc:
        raise APIError(400, str(exc), param="logit_bias") from None


def _parse_grammar(view: Any, text: str) -> "llama_cpp.LlamaGrammar":
    """The request's GBNF grammar, refused with a 400 when llama.cpp cannot parse it."""
    grammar = llama_cpp.LlamaGrammar.from_string(text, verbose=False)
    try:
        check_grammar(view._model.vocab, grammar)
    except ValueError as exc:
        raise APIError(400, str(exc), param="grammar", code="invalid_grammar") from None
    return grammar


async def _next_item(job: _Job, served: "_Served", request: Optional[Request] = None,
                     shutdown: Optional["anyio.Event"] = None) -> Tuple[str, Any]:
    """The job's next item; raises ``_ClientGone`` if the client of ``request`` leaves meanwhile
    (a stream's disconnection is sse-starlette's to watch), and ``_ShutdownDeadline`` once a
    stopping server's time for running requests has run out (``shutdown``: set by sse-starlette
    when the server is told to stop)."""
    getter = asyncio.ensure_future(job.items.get())
    try:
        while True:
            if shutdown is not None and shutdown.is_set():
                served.begin_shutdown()
            if time.monotonic() > served.deadline:   # checked first: a stream's items come without pause
                raise _ShutdownDeadline
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if request is not None and await request.is_disconnected():
                raise _ClientGone
    finally:
        getter.cancel()  # a no-op once it has its item; an item not taken stays in the queue


def _has_finish_reason(chunk: Any) -> bool:
    try:
        return any(choice.get("finish_reason") for choice in chunk["choices"])
    except (KeyError, TypeError, AttributeError):
        return False


async def _respond(served: _Served, request: Request, method: str, kwargs: Dict[str, Any]) -> Response:
    options = kwargs.pop("stream_options", None) or {}
    served.metrics.requests.labels(endpoint=method).inc()
    if served.stopping:
        served.metrics.rejected.labels(reason="shutting_down").inc()
        return _shutting_down().response()
    job = _Job(served, method, kwargs, include_usage=bool(kwargs.get("stream") and options.get("include_usage")))
    job.start()
    try:
        kind, first = await _next_item(job, served, request)
    except _ClientGone:
        job.cancel()
        return Response(status_code=499)  # nobody reads it
    except _ShutdownDeadline:
        job.cancel()
        return _shutting_down().response()
    except BaseException:  # cancelled: the server is stopping
        job.cancel()
        raise
    if kind == "error":
        return _api_error(first).response()
    if kind == "end":
        return APIError(500, "the request ended without an answer", type="server_error").response()
    if kind == "result":
        return JSONResponse(first)

    async def events() -> AsyncIterator[Dict[str, str]]:
        finished = _has_finish_reason(first)
        try:
            yield {"data": json.dumps(first)}
            while True:
                try:
                    kind, value = await _next_item(job, served, shutdown=shutdown)
                except _ShutdownDeadline:
                    finished = True
                    yield {"event": "error", "data": json.dumps(_shutting_down().body())}
                    break
                if kind == "chunk":
                    finished = finished or _has_finish_reason(value)
                    yield {"data": json.dumps(value)}
                elif kind == "error":
                    finished = True
                    yield {"event": "error", "data": json.dumps(_api_error(value).body())}
                elif kind == "end":
                    break
            if not finished:  # never a stream that silently stops without a reason
                error = APIError(500, "the stream ended without a finish_reason", type="server_error")
                yield {"event": "error", "data": json.dumps(error.body())}
            yield {"data": "[DONE]"}
        finally:
            job.cancel()  # a client that went away frees its sequence

    # on SIGTERM sse-starlette would cut every stream at once (no finish_reason, no error): with a
    # shutdown event it waits; the stream itself ends at the server's deadline, with an error event
    shutdown = anyio.Event()
    return EventSourceResponse(events(), shutdown_event=shutdown,
                               shutdown_grace_period=served.shutdown_timeout_s + 4 * DISCONNECT_POLL_S)


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, description="A last chunk with the usage of the request.")


class CompletionRequest(CreateCompletionRequest):
    """llama-cpp-python's completion request with OpenAI's ``stream_options``."""

    stream_options: Optional[StreamOptions] = None


class ChatMessage(BaseModel):
    """A chat message as OpenAI's API allows it: ``content`` a text, a list of parts or null (an
    assistant's tool call; llama-cpp-python's types want a text there); other fields (``name``,
    ``tool_calls``, ``tool_call_id``, ...) go to the chat format as given."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "function"]
    content: Optional[Union[str, List[Dict[str, Any]]]] = None


class ChatRequest(CreateChatCompletionRequest):
    """llama-cpp-python's chat request with OpenAI's newer name for ``max_tokens`` and its
    ``stream_options``: the openai client sends ``max_completion_tokens``, and an unknown field is
    ignored, so without it a request's limit would silently become the whole context."""

    max_completion_tokens: Optional[int] = Field(
        default=None, description="The maximum number of tokens to generate (OpenAI's name for max_tokens).")
    stream_options: Optional[StreamOptions] = None
    messages: List[ChatMessage] = Field(default=[], description="The conversation so far.")
    reasoning_format: Optional[Literal["none", "deepseek"]] = Field(
        default=None, description="deepseek: the thinking in reasoning_content (default: the server's setting).")


def _text_messages(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Messages whose ``content`` the chat template can read: a list of text parts (what many
    OpenAI clients send) joined by newlines, and null (an assistant's tool call) as empty text
    where no call carries the message. Other parts are refused: the model reads text."""
    texts = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise _unsupported(f"messages.{i}.content", f"a content part of type {kind!r} (text parts only)")
                parts.append(part.get("text") or "")
            message = dict(message, content="\n".join(parts))
        elif content is None and not (message.get("tool_calls") or message.get("function_call")):
            message = dict(message, content="")
        texts.append(message)
    return texts


def _max_tokens(body: ChatRequest) -> Optional[int]:
    """The chat's token limit from ``max_tokens`` or ``max_completion_tokens``: None or 0 runs up
    to the context (llama-cpp-python's meaning); a negative one is refused, as the completions
    endpoint refuses it (llama-cpp-python would take it for no limit at all)."""
    limits = {name: value for name, value in (("max_tokens", body.max_tokens),
                                              ("max_completion_tokens", body.max_completion_tokens))
              if value is not None}
    for name, value in limits.items():
        if value < 0:
            raise APIError(400, f"{name} must be at least 0 (0 or null: up to the context), got {value}", param=name)
    if len(set(limits.values())) > 1:
        raise APIError(400, f"max_tokens ({body.max_tokens}) and max_completion_tokens ({body.max_completion_tokens}) "
                            f"differ: give one of them", param="max_completion_tokens")
    return next(iter(limits.values()), None)


def _unsupported(name: str, why: str) -> APIError:
    return APIError(400, f"{name} is not supported by rkv-local serve: {why}", param=name, code="unsupported_parameter")


def create_app(llm: BatchedLlama, *, model_alias: str, api_key: Optional[str] = None,
               shutdown_timeout_s: float = 30.0, max_queue: Optional[int] = None,
               reasoning_format: str = "none") -> FastAPI:
    """The FastAPI app serving ``llm`` under the name ``model_alias``.

    ``/v1/completions``, ``/v1/chat/completions`` (streamed or not), ``/v1/models``, ``/health``,
    ``GET /rkv/stats`` (KV figures of the whole context and of each sequence) and ``GET /metrics``
    (Prometheus). With ``max_queue``, a request beyond ``n_seq_max`` running and ``max_queue``
    waiting gets a 503 with ``Retry-After``. ``reasoning_format="deepseek"`` answers chats with the
    thinking in ``reasoning_content`` (a request's own ``reasoning_format`` wins). With
    ``api_key`` every route but ``/health`` wants ``Authorization: Bearer <api_key>``. The caller
    keeps ``llm``: close it after the server stopped, once ``drain(app)`` returned True. A caller
    that stops the server calls ``begin_shutdown(app)`` first (``rkv-local serve`` does on SIGTERM
    and SIGINT), so that no answer ends without a ``finish_reason`` or an error.
    """
    served = _Served(llm, model_alias, api_key, shutdown_timeout_s, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(served.drain, 5.0)

    app = FastAPI(title="rkv-local", version="0.1.0", lifespan=lifespan)
    app.state.rkv = served
    bearer = HTTPBearer(auto_error=False)

    async def authenticate(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:  # noqa: B008
        if served.api_key is None:
            return
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), served.api_key.encode()):
            raise APIError(401, "Invalid API key", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            where = ""
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'JSON decode error')})"
        else:
            where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return APIError(400, message, param=where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    auth = [Depends(authenticate)]

    @app.post("/v1/completions", dependencies=auth, tags=["OpenAI V1"], summary="Completion")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        if isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                raise _unsupported("prompt", f"one prompt per request, got {len(body.prompt)}")
            body.prompt = body.prompt[0] if body.prompt else ""
        if (body.n or 1) != 1:
            raise _unsupported("n", "one choice per request")
        if (body.best_of or 1) != 1:
            raise _unsupported("best_of", "one candidate per request")
        if body.logprobs is not None:
            raise _unsupported("logprobs", "a batched sequence keeps the logits of its last token only")
        kwargs = body.model_dump(exclude={"model", "n", "best_of", "user", "logprobs"})
        return await _respond(served, request, "create_completion", kwargs)

    @app.post("/v1/chat/completions", dependencies=auth, tags=["OpenAI V1"], summary="Chat")
    async def chat_completions(request: Request, body: ChatRequest) -> Response:
        if (body.n or 1) != 1:
            raise _unsupported("n", "one choice per request")
        if body.logprobs or body.top_logprobs is not None:
            raise _unsupported("logprobs", "a batched sequence keeps the logits of its last token only")
        body.max_tokens = _max_tokens(body)
        kwargs = body.model_dump(exclude={"model", "n", "user", "logprobs", "top_logprobs", "max_completion_tokens"})
        kwargs["messages"] = _text_messages(kwargs["messages"])
        kwargs["reasoning_format"] = kwargs.get("reasoning_format") or reasoning_format
        return await _respond(served, request, "create_chat_completion", kwargs)

    @app.get("/v1/models", dependencies=auth, tags=["OpenAI V1"], summary="Models")
    async def models() -> Dict[str, Any]:
        return {"object": "list", "data": [{"id": served.model_alias, "object": "model", "created": served.created,
                                            "owned_by": "rkv-local", "permissions": []}]}

    @app.get("/health", tags=["rkv-local"], summary="Liveness")
    async def health() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/rkv/stats", dependencies=auth, tags=["rkv-local"], summary="KV-cache statistics")
    async def stats() -> Dict[str, Any]:
        def collect() -> Dict[str, Any]:
            running, waiting = served.counts()
            sequences = [dict(seq_id=s, busy=s in running, **dataclasses.asdict(llm.kv_stats(s)))
                         for s in range(llm.n_seq_max)]
            return {"model": served.model_alias, "parallel": llm.n_seq_max, "requests_running": len(running),
                    "requests_waiting": waiting, "requests_finished": served.n_finished,
                    "requests_waited": served.n_waited, "requests_cancelled": served.n_cancelled, "scheduler": dataclasses.asdict(llm.step_stats()),
                    "context": dataclasses.asdict(llm.kv_stats()), "sequences": sequences,
                    "last_finished": served.last_finished}

        return await run_in_threadpool(collect)

    @app.get("/metrics", dependencies=auth, tags=["rkv-local"], summary="Prometheus metrics")
    async def metrics() -> Response:
        body = await run_in_threadpool(generate_latest, served.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def begin_shutdown(app: FastAPI) -> None:
    """Tell the app the server is stopping: new requests get 503 (with ``Retry-After``), running
    ones have ``shutdown_timeout_s`` to finish; then an open stream ends with an ``error`` event and
    ``[DONE]``, a request still waiting for its answer with a 503."""
    app.state.rkv.begin_shutdown()


def drain(app: FastAPI, timeout_s: float = 5.0) -> bool:
    """Cancel the app's requests and wait for their threads; True when none is left, so that
    closing the ``BatchedLlama`` is safe."""
    return app.state.rkv.drain(timeout_s)
