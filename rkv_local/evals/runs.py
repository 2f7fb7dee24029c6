"""Configurations an evaluation compares (``full`` or a method at a budget), their command-line
arguments, and a ``Llama`` opened for one of them."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import BatchedLlama, Llama
from .._native import METHOD_IDS
from ..models import resolve_model
from ..settings import KVSettings

COMPRESSED_METHODS = tuple(METHOD_IDS)          # rkv, snapkv, h2o, streamingllm, keydiff, triattention
ALL_METHODS = ("full",) + COMPRESSED_METHODS
DEFAULT_WINDOW = 8
DEFAULT_LAMBDA = 0.1


@dataclass(frozen=True)
class RunConfig:
    """One KV-cache setting compared in a run: ``full`` or a method at a budget."""

    method: str
    budget: Optional[int] = None
    buffer: int = 128
    window: int = DEFAULT_WINDOW
    lam: float = DEFAULT_LAMBDA
    calibration: Optional[str] = None   # triattention's file (None: the cached automatic one)

    @property
    def series(self) -> str:
        """The method and the settings that differ from the defaults: what a curve over budgets shows."""
        if self.method == "full":
            return "full"
        window = f",w{self.window}" if self.window != DEFAULT_WINDOW else ""
        lam = f",λ{self.lam:g}" if self.method == "rkv" and self.lam != DEFAULT_LAMBDA else ""
        return f"{self.method}{window}{lam}"

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        method, _, settings = self.series.partition(",")
        return f"{method}@{self.budget}" + (f",{settings}" if settings else "")

    def kv_settings(self) -> KVSettings:
        if self.method == "full":
            return KVSettings()
        return KVSettings(self.budget, self.buffer, self.method, self.window, self.lam,
                          kv_calibration=self.calibration if self.method == "triattention" else None)

    def llama_kwargs(self) -> dict[str, Any]:
        return self.kv_settings().to_kwargs()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        d["series"] = self.series
        if self.method == "full":
            d.update(budget=None, buffer=None, window=None, lam=None)
        if self.method != "triattention":
            d.pop("calibration")
        return d


def parse_int_list(text: str) -> list[int]:
    """``"1k,2K,4096"`` -> ``[1024, 2048, 4096]``."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        scale = 1
        if part[-1] in "kK":
            part, scale = part[:-1], 1024
        try:
            value = int(float(part) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {part!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("empty list")
    return out


def parse_methods(text: str) -> list[str]:
    methods = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(methods))


def build_configs(methods: Sequence[str], budgets: Sequence[int], buffer: int, window: int, lam: float,
                  *, include_full: bool = True, calibration: Optional[str] = None) -> list[RunConfig]:
    """``full`` first (when included), then every compressed method at every budget."""
    configs = []
    if include_full or "full" in methods:
        configs.append(RunConfig("full"))
    for method in methods:
        if method == "full":
            continue
        for budget in budgets:
            if budget <= window:
                raise SystemExit(f"error: budget {budget} must exceed kv_window {window}")
            configs.append(RunConfig(method, int(budget), int(buffer), int(window), float(lam),
                                     calibration if method == "triattention" else None))
    return configs


def add_model_arguments(parser: argparse.ArgumentParser, *, rpc: bool = False) -> None:
    parser.add_argument("model", help="a GGUF file or a known model name (smollm2-135m, qwen2.5-coder-0.5b)")
    parser.add_argument("--threads", type=int, metavar="N", default=os.cpu_count() or 1,
                        help="CPU threads for decoding and prompt processing (default: all cores, %(default)s)")
    parser.add_argument("--n-gpu-layers", type=int, metavar="N", default=0,
                        help="layers to offload to a GPU build or the --rpc servers (-1: all; default 0, all with --rpc)")
    if rpc:
        parser.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                            help="llama.cpp rpc-server(s) holding the layers and their KV caches")


def add_kv_arguments(parser: argparse.ArgumentParser, *, methods: str, budgets: str, buffer: int = 128,
                     buffer_help: str = "") -> None:
    parser.add_argument("--methods", type=parse_methods, metavar="LIST", default=parse_methods(methods),
                        help=f"comma-separated KV methods among {', '.join(ALL_METHODS)} (default: {methods})")
    parser.add_argument("--budgets", type=parse_int_list, metavar="LIST", default=parse_int_list(budgets),
                        help=f"comma-separated KV budgets (cells per layer and head; 1k = 1024; default: {budgets})")
    KVSettings.add_arguments(parser, only=("kv_buffer", "kv_window", "kv_lambda", "kv_calibration"),
                             defaults={"kv_buffer": buffer}, helps={"kv_buffer": buffer_help} if buffer_help else {})


def configs_from_args(args: argparse.Namespace, *, include_full: bool = True) -> list[RunConfig]:
    return build_configs(args.methods, args.budgets, args.kv_buffer, args.kv_window, args.kv_lambda,
                         include_full=include_full, calibration=args.kv_calibration)


def open_llama(model_path: Path, config: RunConfig, *, n_ctx: int, threads: int, n_gpu_layers: int = 0,
               n_batch: Optional[int] = None, seed: int = 0, flash_attn: bool = False,
               rpc_servers: Optional[str] = None) -> Llama:
    """A ``Llama`` for one configuration. ``n_ctx`` is the physical context of ``full`` and the
    logical one of a budgeted cache; a budgeted cache takes ``n_batch = kv_buffer`` unless smaller.
    With ``rpc_servers`` and no ``n_gpu_layers``, every layer goes to the servers."""
    kwargs: dict[str, Any] = dict(n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False,
                                  n_ctx=int(n_ctx), flash_attn=flash_attn)
    if n_gpu_layers or not rpc_servers:
        kwargs["n_gpu_layers"] = n_gpu_layers
    if rpc_servers:
        kwargs["rpc_servers"] = rpc_servers
    if config.method == "full":
        kwargs["n_batch"] = int(n_batch or 512)
    elif n_batch:
        kwargs["n_batch"] = min(int(n_batch), config.buffer)
    return Llama(str(model_path), **kwargs, **config.llama_kwargs())


def open_batched(model_path: Path, config: RunConfig, *, n_ctx: int, threads: int, n_gpu_layers: int = 0,
                 n_seq_max: int) -> BatchedLlama:
    """A ``BatchedLlama`` of ``n_seq_max`` sequences for one configuration (``n_ctx`` per sequence)."""
    return BatchedLlama(model_path, n_seq_max=n_seq_max, n_ctx=int(n_ctx), n_threads=threads,
                        n_threads_batch=threads, n_gpu_layers=n_gpu_layers, verbose=False, **config.llama_kwargs())


def resolve(model: str) -> Path:
    try:
        return resolve_model(model)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
