"""``rkv-local serve``: llama-cpp-python's OpenAI-compatible server driving ``rkv_local.Llama``.

llama-cpp-python's server (``llama_cpp.server``, the ``server`` extra) builds its model in
``LlamaProxy.load_llama_from_model_settings`` by calling ``llama_cpp.Llama(...)`` with every
field of a ``ModelSettings``. We keep all of that (chat formats, caches, LoRA, ...) and only
change which class it constructs:

* ``RkvModelSettings`` is ``ModelSettings`` plus the ``kv_*`` fields;
* ``RkvLlamaProxy.load_llama_from_model_settings`` runs the stock loader while
  ``llama_cpp.Llama`` names a subclass of ``rkv_local.Llama`` bound to those ``kv_*`` settings;
* ``create_app`` runs the stock ``create_app`` with ``RkvLlamaProxy`` as its proxy class.

Both substitutions last only for the call that needs them (under a lock) and are undone
afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator, Optional

from . import Llama

__all__ = ["ServerExtrasMissing", "create_app", "RkvLlamaProxy", "RkvModelSettings", "SERVER_EXTRAS"]

# what llama-cpp-python 0.3.36 declares for its own `server` extra; pyproject.toml repeats it
SERVER_EXTRAS = (
    "uvicorn>=0.22.0",
    "fastapi>=0.100.0",
    "pydantic-settings>=2.0.1",
    "sse-starlette>=1.6.1",
    "starlette-context>=0.3.6,<0.4",
    "PyYAML>=5.1",
)


class ServerExtrasMissing(ImportError):
    """The packages llama-cpp-python's server needs are not installed."""


try:
    import llama_cpp
    import llama_cpp.server.app as _app_module
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from pydantic import Field
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ServerExtrasMissing(
        f"`rkv-local serve` needs llama-cpp-python's server packages ({exc}); install them with "
        f"pip install 'rkv-local[server]'  (or: pip install {' '.join(repr(r) for r in SERVER_EXTRAS)})"
    ) from exc

_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _substituted(owner: Any, name: str, value: Any) -> Iterator[None]:
    with _PATCH_LOCK:
        original = getattr(owner, name)
        setattr(owner, name, value)
        try:
            yield
        finally:
            setattr(owner, name, original)


class RkvModelSettings(ModelSettings):
    """llama-cpp-python's model settings plus rkv-local's KV-cache compression."""

    kv_budget: Optional[int] = Field(default=None, ge=1, description="KV tokens kept per layer and head (None: full cache)")
    kv_buffer: int = Field(default=128, ge=1, description="tokens decoded between two compressions")
    kv_method: str = Field(default="rkv", description="rkv, snapkv, h2o or streamingllm")
    kv_window: int = Field(default=8, ge=1, description="recent tokens always kept; their queries score the rest")
    kv_lambda: float = Field(default=0.1, description="R-KV weight of importance against redundancy")


def _bound_llama_class(settings: ModelSettings) -> type:
    """A subclass of ``rkv_local.Llama`` whose constructor adds ``settings``' kv_* arguments."""
    kv = {}
    if isinstance(settings, RkvModelSettings) and settings.kv_budget is not None:
        kv = dict(
            kv_budget=settings.kv_budget,
            kv_buffer=settings.kv_buffer,
            kv_method=settings.kv_method,
            kv_window=settings.kv_window,
            kv_lambda=settings.kv_lambda,
        )

    class ServedLlama(Llama):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, **kv})

    ServedLlama.__qualname__ = ServedLlama.__name__ = "Llama"
    return ServedLlama


class RkvLlamaProxy(LlamaProxy):
    """``LlamaProxy`` whose models are ``rkv_local.Llama`` instances."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        with _substituted(llama_cpp, "Llama", _bound_llama_class(settings)):
            return LlamaProxy.load_llama_from_model_settings(settings)


def create_app(
    model_settings: RkvModelSettings,
    server_settings: Optional[ServerSettings] = None,
) -> Any:
    """The FastAPI app of llama-cpp-python's server, serving ``model_settings`` with rkv-local.

    Loads the model now, so bad settings raise here (``ValueError``) before any socket opens.
    """
    if model_settings.kv_budget is not None:
        # one decode call may carry at most kv_buffer tokens; logits of every position would not fit a budget
        model_settings = model_settings.model_copy(update=dict(
            n_batch=min(model_settings.n_batch, model_settings.kv_buffer),
            n_ubatch=min(model_settings.n_ubatch, model_settings.kv_buffer),
            logits_all=False,
        ))
    server_settings = server_settings or ServerSettings()
    with _substituted(_app_module, "LlamaProxy", RkvLlamaProxy):
        app = _app_module.create_app(server_settings=server_settings, model_settings=[model_settings])
    _add_stats_route(app)
    return app


def _add_stats_route(app: Any) -> None:
    """``GET /rkv/stats``: the served model's ``kv_stats()`` as JSON (waits for a running request)."""
    from fastapi import Depends

    get_proxy = _app_module.get_llama_proxy
    authenticate = _app_module.authenticate

    async def kv_stats(proxy=Depends(get_proxy)):  # noqa: B008 - FastAPI's dependency style
        llm = proxy(None)
        return dataclasses.asdict(llm.kv_stats())

    app.add_api_route("/rkv/stats", kv_stats, methods=["GET"], tags=["rkv-local"],
                      dependencies=[Depends(authenticate)], summary="KV-cache statistics of the served model")
