"""Helpers shared by ``bench``, ``fidelity`` and ``tasks``: run configurations, opening a model
for one configuration, chat prompts, greedy steps, process memory, progress and output files."""
from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from . import Llama, llama_cpp
from ._native import METHOD_IDS
from .models import resolve_model

COMPRESSED_METHODS = tuple(METHOD_IDS)          # rkv, snapkv, h2o, streamingllm
ALL_METHODS = ("full",) + COMPRESSED_METHODS


# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One KV-cache setting compared in a run: ``full`` or a method at a budget."""

    method: str
    budget: Optional[int] = None
    buffer: int = 128
    window: int = 8
    lam: float = 0.1

    @property
    def label(self) -> str:
        return "full" if self.method == "full" else f"{self.method}@{self.budget}"

    def llama_kwargs(self) -> dict[str, Any]:
        if self.method == "full":
            return {}
        return dict(kv_budget=self.budget, kv_buffer=self.buffer, kv_method=self.method,
                    kv_window=self.window, kv_lambda=self.lam)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        if self.method == "full":
            d.update(budget=None, buffer=None, window=None, lam=None)
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
                  *, include_full: bool = True) -> list[RunConfig]:
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
            configs.append(RunConfig(method, int(budget), int(buffer), int(window), float(lam)))
    return configs


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a GGUF file or a known model name (smollm2-135m, qwen2.5-coder-0.5b)")
    parser.add_argument("--threads", type=int, metavar="N", default=os.cpu_count() or 1,
                        help="CPU threads for decoding and prompt processing (default: all cores, %(default)s)")
    parser.add_argument("--n-gpu-layers", type=int, metavar="N", default=0,
                        help="layers to offload to a GPU build (-1: all; default 0)")


def add_kv_arguments(parser: argparse.ArgumentParser, *, methods: str, budgets: str, buffer: int = 128,
                     buffer_help: str = "") -> None:
    parser.add_argument("--methods", type=parse_methods, metavar="LIST", default=parse_methods(methods),
                        help=f"comma-separated KV methods among {', '.join(ALL_METHODS)} (default: {methods})")
    parser.add_argument("--budgets", type=parse_int_list, metavar="LIST", default=parse_int_list(budgets),
                        help=f"comma-separated KV budgets (cells per layer and head; 1k = 1024; default: {budgets})")
    parser.add_argument("--kv-buffer", type=int, metavar="N", default=buffer,
                        help=(buffer_help or "tokens decoded between two compressions") + " (default: %(default)s)")
    parser.add_argument("--kv-window", type=int, metavar="N", default=8, help="observation window α (default: %(default)s)")
    parser.add_argument("--kv-lambda", type=float, metavar="X", default=0.1,
                        help="R-KV importance weight λ (default: %(default)s)")


def configs_from_args(args: argparse.Namespace, *, include_full: bool = True) -> list[RunConfig]:
    return build_configs(args.methods, args.budgets, args.kv_buffer, args.kv_window, args.kv_lambda,
                         include_full=include_full)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def open_llama(model_path: Path, config: RunConfig, *, n_ctx: int, threads: int, n_gpu_layers: int = 0,
               n_batch: Optional[int] = None, seed: int = 0) -> Llama:
    """A ``Llama`` for one configuration. ``n_ctx`` is the physical context of ``full`` and the
    logical one of a budgeted cache; a budgeted cache takes ``n_batch = kv_buffer`` unless smaller."""
    kwargs: dict[str, Any] = dict(n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                                  seed=seed, verbose=False, n_ctx=int(n_ctx))
    if config.method == "full":
        kwargs["n_batch"] = int(n_batch or 512)
    elif n_batch:
        kwargs["n_batch"] = min(int(n_batch), config.buffer)
    return Llama(str(model_path), **kwargs, **config.llama_kwargs())


def n_ctx_train(model_path: Path) -> int:
    """The model's training context, read without creating a context."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise RuntimeError(f"cannot load {model_path}")
    try:
        return int(llama_cpp.llama_model_n_ctx_train(model))
    finally:
        llama_cpp.llama_model_free(model)


def clear_cache(llm: Llama) -> None:
    """Forget every token (a full clear also resets the compression state)."""
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)


def eog_tokens(llm: Llama) -> np.ndarray:
    """All end-of-generation tokens of the vocabulary (EOS, EOT, <|im_end|>, ...)."""
    vocab = llm._model.vocab
    return np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.int64)


def last_logits(llm: Llama) -> np.ndarray:
    """A view of the logits of the last evaluated token (valid until the next decode)."""
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy_token(llm: Llama, banned: Optional[np.ndarray] = None) -> int:
    logits = last_logits(llm)
    if banned is not None and len(banned):
        logits[banned] = -np.inf   # the buffer is rewritten by the next decode
    return int(np.argmax(logits))


def eval_all_logits(llm: Llama, tokens: Sequence[int]) -> np.ndarray:
    """Evaluate ``tokens`` (one decode call, at most ``n_batch``) and return the logits of every one,
    ``[len(tokens), n_vocab]`` (a view valid until the next decode)."""
    n = len(tokens)
    if n > llm.n_batch:
        raise ValueError(f"{n} tokens exceed n_batch {llm.n_batch}")
    n_past = llm.n_tokens
    llm._batch.set_batch(batch=list(tokens), n_past=n_past, logits_all=True)
    llm._ctx.decode(llm._batch)
    llm.input_ids[n_past:n_past + n] = tokens
    llm.n_tokens += n
    ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
    return np.ctypeslib.as_array(ptr, shape=(n, llm.n_vocab()))


class ChatTemplate:
    """The model's own chat template (GGUF metadata), rendered to text and tokens."""

    def __init__(self, llm: Llama) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise SystemExit("error: the model has no chat template (tokenizer.chat_template) in its GGUF")
        eos, bos = llm.token_eos(), llm.token_bos()
        self._llm = llm
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation with the assistant's generation prompt appended."""
        return self._formatter(messages=messages).prompt

    def tokens(self, text: str) -> list[int]:
        # as llama-cpp-python's chat handlers do: the template writes BOS itself where it wants one
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


# ---------------------------------------------------------------------------
# Process memory
# ---------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release_memory() -> None:
    """Collect garbage and give freed heap back to the OS, so the next baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gpu_memory_bytes() -> Optional[int]:
    """GPU memory this process holds, from nvidia-smi; None without an NVIDIA GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].isdigit():
            total += int(parts[1]) * 2**20
    return total


# ---------------------------------------------------------------------------
# Progress, files, tables
# ---------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A progress bar with elapsed time and ETA on stderr.

    On a terminal it redraws one line; otherwise (a log file) it prints a line at most every
    ``log_every`` seconds and at the end."""

    def __init__(self, total: float, desc: str = "", *, stream=None, width: int = 24, log_every: float = 30.0):
        self.total = max(float(total), 0.0)
        self.done = 0.0
        self.desc = desc
        self.note = ""
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every
        self._last = -math.inf

    def update(self, amount: float = 1.0, note: Optional[str] = None) -> None:
        self.done += amount
        if note is not None:
            self.note = note
        self._draw()

    def set_note(self, note: str) -> None:
        self.note = note
        self._draw()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        eta = elapsed * (self.total - self.done) / self.done if self.done > 0 else math.inf
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        count = f"{self.done:.0f}/{self.total:.0f}"
        text = f"{self.desc} [{bar}] {count} {100 * frac:5.1f}% {format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}"
        return text + (f"  {self.note}" if self.note else "")

    def _draw(self, final: bool = False) -> None:
        now = time.perf_counter()
        if self.tty:
            if final or now - self._last >= 0.2:
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
                self._last = now
        elif final or now - self._last >= self.log_every:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last = now

    def close(self) -> None:
        self._draw(final=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_json(path: Path, data: Any) -> None:
    """Write atomically, so an interrupted run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def file_digest(path: Path, size: int = 1 << 20) -> str:
    """A cheap identity of a (large) file: its size and the hash of its first MiB."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(size))
    return f"{path.stat().st_size}-{h.hexdigest()[:16]}"


def machine_info(threads: int, n_gpu_layers: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "n_gpu_layers": n_gpu_layers,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
    }


def resolve(model: str) -> Path:
    try:
        return resolve_model(model)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None


# the paper's benchmarks, shipped in the package (rkv_local/data/README.md gives sources and licences)
DATA_DIR = Path(__file__).resolve().parent / "data"
DATASETS = ("gsm8k", "math500", "aime24")


def data_path(text: str) -> Path:
    """``--data``: a JSONL file, or the name of a shipped benchmark (a file of that name wins)."""
    path = Path(text)
    if text in DATASETS and not path.exists():
        return DATA_DIR / f"{text}.jsonl"
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
