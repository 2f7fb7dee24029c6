"""The ``kv_*`` settings of a ``Llama``: one frozen dataclass that validates them and from which the
engine's configuration, the command line's options, a pickled ``Llama`` and the error messages are
made. A field's name is the keyword argument (``kv_budget``), its option is ``--kv-budget``.

Adding a setting: a field here (with its help text) and, if the engine reads it, the C struct.
"""
from __future__ import annotations

import argparse
import difflib
import numbers
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Optional

from .reference import METHODS

if TYPE_CHECKING:
    from ._native import CompressionConfig

KV_COMPRESS = ("all", "think")


def _option(help: str, metavar: Optional[str] = None, choices: Optional[tuple[str, ...]] = None,
            default_text: Optional[str] = None) -> dict[str, Any]:
    """A field's command-line option: its help (the default is added), metavar or choices."""
    return {"help": help, "metavar": metavar, "choices": choices, "default_text": default_text}


@dataclass(frozen=True)
class KVSettings:
    """Every KV-cache setting of a ``Llama`` or ``BatchedLlama``; without ``kv_budget`` the cache is
    llama.cpp's full one and the others are unused."""

    kv_budget: Optional[int] = field(default=None, metadata=_option(
        "tokens kept per layer and KV head", "B", default_text="no budget, a full cache"))
    kv_buffer: int = field(default=128, metadata=_option("tokens decoded between two compressions", "b"))
    kv_method: str = field(default="rkv", metadata=_option("scoring method", choices=METHODS))
    kv_window: int = field(default=8, metadata=_option(
        "recent tokens always kept, whose queries score the others; the budget must exceed it", "W"))
    kv_lambda: float = field(default=0.1, metadata=_option(
        "R-KV: weight of attention importance against redundancy, in [0, 1]", "L"))
    kv_keep_prompt: int = field(default=0, metadata=_option(
        "cells set aside for the prompt: its first N tokens are never evicted, and a next chat turn evaluates "
        "only its new tokens", "N"))
    kv_compress: str = field(default="all", metadata=_option(
        "think: stop compressing where the model ends its thinking (</think>, gpt-oss's final channel), so the "
        "answer is not evicted", choices=KV_COMPRESS))
    kv_think_end: Optional[str] = field(default=None, metadata=_option(
        "the end-of-thinking marker for --kv-compress think", "TEXT", default_text="from the chat template"))
    kv_calibration: Optional[str] = field(default=None, metadata=_option(
        "triattention: the model's query statistics, from `rkv-local calibrate`", "FILE",
        default_text="calibrated once and cached beside the downloaded models"))

    def __post_init__(self) -> None:
        # a budget of 0 or below is refused below, by the window it must exceed
        for name, minimum in (("kv_budget", None), ("kv_buffer", 1), ("kv_window", 1), ("kv_keep_prompt", 0)):
            value = getattr(self, name)
            if value is not None or name != "kv_budget":
                object.__setattr__(self, name, _count(name, value, minimum))
        if self.kv_method not in METHODS:
            raise ValueError(f"unknown kv_method {self.kv_method!r}; choose one of {', '.join(METHODS)}")
        if isinstance(self.kv_lambda, bool) or not isinstance(self.kv_lambda, numbers.Real) \
                or not 0.0 <= float(self.kv_lambda) <= 1.0:
            raise ValueError(f"kv_lambda must lie in [0, 1], got {self.kv_lambda!r}")
        object.__setattr__(self, "kv_lambda", float(self.kv_lambda))
        if self.kv_compress not in KV_COMPRESS:
            raise ValueError(f"unknown kv_compress {self.kv_compress!r}; choose one of {', '.join(KV_COMPRESS)}")
        if self.kv_think_end is not None and not isinstance(self.kv_think_end, str):
            raise TypeError(f"kv_think_end must be text, got {type(self.kv_think_end).__name__}")
        if self.kv_budget is not None and self.kv_budget <= self.kv_window:
            raise ValueError(f"kv_budget ({self.kv_budget}) must exceed kv_window ({self.kv_window})")
        if self.kv_calibration is not None:
            object.__setattr__(self, "kv_calibration", os.fspath(self.kv_calibration))
            if self.kv_budget is None or self.kv_method != "triattention":
                raise ValueError(f"kv_calibration is for kv_method triattention with a kv_budget (kv_calibration is "
                                 f"triattention's query statistics); kv_method is {self.kv_method!r}")
            if not os.path.isfile(self.kv_calibration):
                raise ValueError(f"no calibration file {self.kv_calibration} (make one with "
                                 f"`rkv-local calibrate MODEL --out FILE`)")

    # -- the ways in ------------------------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any], *, known: frozenset[str] = frozenset()) -> "KVSettings":
        """Take the ``kv_*`` keyword arguments out of ``kwargs``; a misspelled one (not a setting and not
        in ``known``, llama-cpp-python's own ``kv_overrides``) is a TypeError naming the closest."""
        names = cls.names()
        for name in list(kwargs):
            if name.startswith("kv_") and name not in names and name not in known:
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]}?" if close else f" (the kv_* arguments: {', '.join(names)})"
                raise TypeError(f"unexpected keyword argument {name!r}{hint}")
        return cls(**{name: kwargs.pop(name) for name in names if name in kwargs})

    @classmethod
    def add_arguments(cls, group: argparse._ActionsContainer, *, only: Optional[tuple[str, ...]] = None,
                      command_defaults: Optional[dict[str, str]] = None, defaults: Optional[dict[str, Any]] = None,
                      helps: Optional[dict[str, str]] = None) -> None:
        """One ``--kv-*`` option per setting (or per setting in ``only``), its help and choices from the
        field. ``command_defaults``: the settings whose default the command decides (parsed as None), with
        what its help says of it; ``defaults`` and ``helps`` replace a field's default and help."""
        command_defaults, defaults, helps = command_defaults or {}, defaults or {}, helps or {}
        for f in fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            decided = f.name in command_defaults
            default = defaults.get(f.name, f.default)
            said = command_defaults.get(f.name) or (meta["default_text"] if default is None else str(default))
            options: dict[str, Any] = dict(default=None if decided else default,
                                           help=f"{helps.get(f.name, meta['help'])} (default: {said})")
            if meta["choices"]:
                options["choices"] = meta["choices"]
            else:
                kind = f.type if f.type in ("int", "float") else "int" if f.name in ("kv_budget",) else "str"
                options.update(type={"int": int, "float": float, "str": str}[kind], metavar=meta["metavar"])
            group.add_argument("--" + f.name.replace("_", "-"), **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "KVSettings":
        """The settings of a parsed command line; a refused value is a ValueError naming the option."""
        values = {name: getattr(args, name) for name in cls.names() if getattr(args, name, None) is not None}
        values.update(overrides)
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(option_names(str(exc))) from None

    # -- the ways out -----------------------------------------------------------------------------

    @property
    def compressed(self) -> bool:
        return self.kv_budget is not None

    def engine_config(self) -> "CompressionConfig":
        """The engine's part of the settings (the C struct ``rkv_params``); needs a budget."""
        from ._native import CompressionConfig

        if self.kv_budget is None:
            raise ValueError("no kv_budget: a full cache has no compression settings")
        return CompressionConfig(budget=self.kv_budget, buffer=self.kv_buffer, method=self.kv_method,
                                 window=self.kv_window, lam=self.kv_lambda)

    def to_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that make these settings again (``Llama(path, **s.to_kwargs())``)."""
        return asdict(self) if self.compressed else {}

    def with_(self, **changes: Any) -> "KVSettings":
        return replace(self, **changes)


def option_names(message: str) -> str:
    """A settings error as the command line words it: ``kv_budget`` → ``--kv-budget``."""
    return re.sub(r"\bkv_(\w+)", lambda m: "--kv-" + m.group(1).replace("_", "-"), message)


def _count(name: str, value: Any, minimum: Optional[int]) -> int:
    """A whole number of at least ``minimum`` (a bool is not a count: ``kv_keep_prompt=True`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {'0 or more' if minimum == 0 else f'at least {minimum}'}, got {value}")
    return int(value)
