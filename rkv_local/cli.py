"""``rkv-local``: generate, chat, inspect and serve with a budgeted KV cache.

    rkv-local generate smollm2-135m "Why is the sky blue?" --kv-budget 256 --max-tokens 4000
    rkv-local chat qwen2.5-coder-0.5b --kv-budget 512
    rkv-local inspect smollm2-135m "The capital of France" --kv-budget 32 --kv-buffer 16 --max-tokens 64

generate and inspect send the prompt through the model's chat template when it ships one
(``--raw`` completes it as plain text).
    rkv-local serve smollm2-135m --kv-budget 1024 --port 8000

A model is a GGUF path or a known name (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``gemma3-270m``), downloaded on
first use. Exit status: 0 on success, 2 for bad arguments or settings, 1 for other failures,
130 when interrupted.
"""
from __future__ import annotations

import argparse
import os
from contextlib import closing
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, TextIO

from .models import KNOWN_MODELS
from .reasoning import REASONING_FORMATS
from .settings import KVSettings

PROG = "rkv-local"
# `chat` keeps this much of its prompt whole: each turn then evaluates only what the last one lacked
CHAT_KEEP_PROMPT = 1024


class CliError(Exception):
    """A failure reported as one line on stderr with an exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _device_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """--n-gpu-layers and --rpc as Llama's arguments (with servers and no count, every layer goes there)."""
    kwargs: Dict[str, Any] = {}
    if args.n_gpu_layers is not None:
        kwargs["n_gpu_layers"] = args.n_gpu_layers
    if args.rpc:
        kwargs["rpc_servers"] = args.rpc
    return kwargs


def _add_chat_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-format", default=None, metavar="NAME",
                   help="llama-cpp-python chat format, e.g. chatml (default: the model's own template)")


def _chat_format_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """{"chat_format": NAME} for --chat-format, refused here if llama-cpp-python has no such format."""
    name = getattr(args, "chat_format", None)
    if name is None:
        return {}
    from llama_cpp.llama_chat_format import LlamaChatCompletionHandlerNotFoundException, get_chat_completion_handler

    try:
        get_chat_completion_handler(name)
    except LlamaChatCompletionHandlerNotFoundException as exc:
        raise CliError(str(exc)) from None
    return {"chat_format": name}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help=f"GGUF file, or a known model name: {', '.join(KNOWN_MODELS)} (downloaded once)")
    g = p.add_argument_group("model and context")
    g.add_argument("--n-ctx", type=int, default=0, metavar="N",
                   help="logical context: positions and max tokens run up to it (default: the model's training context)")
    g.add_argument("--n-threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: llama-cpp-python's choice)")
    g.add_argument("--n-gpu-layers", type=int, default=None, metavar="N",
                   help="layers to offload to a GPU or the --rpc servers; -1: all (default 0, all with --rpc)")
    g.add_argument("--rpc", default=None, metavar="HOST:PORT[,...]",
                   help="llama.cpp rpc-server(s) to hold layers and their KV caches (no authentication: loopback "
                        "or a trusted network only)")
    g.add_argument("--flash-attn", action="store_true", help="use flash attention")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    k = p.add_argument_group(
        "KV-cache compression",
        "with --kv-budget each layer and KV head keeps at most BUDGET tokens plus BUFFER decoded since the last "
        "compression, so the cache holds at most BUDGET+BUFFER cells however long the generation runs",
    )
    KVSettings.add_arguments(k, command_defaults={"kv_keep_prompt": f"{CHAT_KEEP_PROMPT} for chat, else 0"})


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N",
                   help=f"tokens to generate (default {max_tokens}; 0: up to the logical context)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature (default 0: greedy)")
    g.add_argument("--top-k", type=int, default=40, metavar="K", help="top-k sampling (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, metavar="P", help="min-p sampling (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="repetition penalty (default 1.0: none)")
    g.add_argument("--seed", type=int, default=None, metavar="S", help="random seed (matters with a temperature above 0)")


def _add_prompt_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", action="store_true",
                   help="complete PROMPT as plain text; by default a model that ships a chat template is sent "
                        "PROMPT as a user message through it (as llama-cli and ollama do)")


def _add_ignore_eos(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore-eos", action="store_true",
                   help="never stop at an end-of-generation token: always produce --max-tokens")


class IntermixedParser(argparse.ArgumentParser):
    """A command's parser: options and positionals in any order (`generate MODEL --kv-budget 256 "prompt"`)."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        # a parser with subcommands cannot parse intermixed; the guard stops the recursion through
        # parse_known_intermixed_args, which calls parse_known_args itself on older Pythons
        if self._subparsers is not None or self._parsing:
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


class _ExampleFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual and keeps the example epilog's lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_command(sub: argparse._SubParsersAction, name: str, handler: Callable[[argparse.Namespace], int], *,
                 help: str, description: str, example: str) -> argparse.ArgumentParser:
    """A command on a MODEL, with one example in its --help."""
    p = sub.add_parser(name, help=help, description=description, epilog=f"example:\n  {PROG} {name} {example}\n",
                       formatter_class=_ExampleFormatter)
    _add_model_args(p)
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="R-KV decode-time KV-cache compression for llama.cpp: generate, chat, inspect and serve "
                    "with a KV cache of at most --kv-budget + --kv-buffer cells.",
        epilog="Run `rkv-local COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=IntermixedParser)

    p = _add_command(sub, "generate", cmd_generate, help="answer a prompt, streaming tokens to stdout",
                     description="Answer PROMPT (or stdin), streaming the tokens to stdout: through the model's "
                                 "chat template when it has one, as plain text with --raw. A status line on "
                                 "stderr shows tokens, KV cells in use, compressions and speed (live when stderr "
                                 "is a terminal, else one summary line at the end).",
                     example='smollm2-135m "Why is the sky blue?" --kv-budget 256 --max-tokens 4000')
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default=None,
                   help="the prompt (default: read stdin; an empty prompt starts from the BOS token)")
    _add_sampling_args(p, max_tokens=256)
    _add_prompt_format_args(p)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message (not with --raw)")
    _add_ignore_eos(p)

    p = _add_command(sub, "chat", cmd_chat, help="interactive chat with the model's chat template",
                     description="Interactive chat: each line read from stdin is a user message; the answer "
                                 "streams to stdout. The conversation is kept, so the compressed cache is reused "
                                 "between turns. `/exit`, `/quit` or end of input ends it; `/reset` starts over.",
                     example="qwen2.5-coder-0.5b --kv-budget 512")
    _add_sampling_args(p, max_tokens=512)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    _add_chat_format_arg(p)

    p = _add_command(sub, "inspect", cmd_inspect, help="show which tokens each layer and KV head kept",
                     description="Generate --max-tokens tokens after PROMPT with the budget, then show which "
                                 "tokens each layer and KV head still holds: coloured in the terminal for one "
                                 "layer, and for every layer and head in a standalone HTML file.",
                     example='smollm2-135m "The capital of France" --kv-budget 32 --kv-buffer 16 --html kept.html')
    p.add_argument("prompt", metavar="PROMPT", help="the prompt")
    _add_sampling_args(p, max_tokens=64)
    _add_prompt_format_args(p)
    _add_ignore_eos(p)
    p.add_argument("--layer", type=int, default=None,
                   help="layer shown in the terminal (default: the first the budget compresses, 0 but for "
                        "sliding-window models)")
    p.add_argument("--head", type=int, action="append", default=None, metavar="H",
                   help="KV head shown in the terminal; repeat for several (default: all)")
    p.add_argument("--html", default="rkv-inspect.html", metavar="FILE",
                   help="HTML file with every layer and head (default rkv-inspect.html; '' for none)")
    p.add_argument("--compress-now", action="store_true",
                   help="compress to the budget once more after generating, so every head holds exactly --kv-budget tokens")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colours in the terminal (default auto: when stdout is a terminal and NO_COLOR is unset)")

    p = _add_command(sub, "serve", cmd_serve, help="OpenAI-compatible HTTP server, concurrent requests batched",
                     description="Serve MODEL over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                                 "streamed or not, /v1/models) with the budgeted KV cache, plus GET /rkv/stats and GET "
                                 "/metrics (Prometheus). Up "
                                 "to --parallel requests decode together, each in a KV stream (and budget) of its "
                                 "own; more wait for a free one. Flash attention is always on, so that a request "
                                 "gives the same text alone or beside others. Needs the server extras: "
                                 "pip install 'rkv-local[server]'.",
                     example="smollm2-135m --kv-budget 1024 --parallel 4 --port 8000")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--parallel", type=_positive_int, default=1, metavar="S",
                   help="requests decoded together, each with its own KV stream of at most BUDGET+BUFFER cells "
                        "(or --n-ctx without a budget); more requests wait (default 1)")
    p.add_argument("--model-alias", default=None, metavar="NAME", help="the model's name in the API (default: MODEL as given)")
    _add_chat_format_arg(p)
    p.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="none",
                   help="deepseek: a reasoning model's thinking goes to message.reasoning_content (delta.reasoning_"
                        "content when streamed), the rest to content, as llama.cpp's server does; a request may "
                        "give its own reasoning_format (default none: all in content)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require this bearer token")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed (requests may give their own)")
    p.add_argument("--max-queue", type=_non_negative_int, default=None, metavar="N",
                   help="at most N requests wait for a sequence; more get 503 with Retry-After (default: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, new requests get 503 and running ones this long to finish; then "
                        "open streams end with an error event, other requests with a 503 (default 30)")

    from .evals import add_commands  # the evaluation commands; the runtime itself never imports evals

    p = sub.add_parser("calibrate", help="triattention's query statistics of a model, into a file",
                       description="Decode a text with MODEL and save, per head of every compressed layer, the mean "
                                   "of its pre-RoPE queries and of each rotated pair's modulus: what --kv-method "
                                   "triattention scores with (--kv-calibration FILE). The file names the model by "
                                   "its tensors and is refused for another one.",
                       epilog=f"example:\n  {PROG} calibrate smollm2-135m --out smollm2.npz\n",
                       formatter_class=_ExampleFormatter)
    p.add_argument("model", metavar="MODEL",
                   help=f"GGUF file, or a known model name: {', '.join(KNOWN_MODELS)} (downloaded once)")
    p.add_argument("--out", required=True, metavar="FILE", help="the calibration file to write (.npz)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="a UTF-8 text file to calibrate on (default: MATH-500 problems and solutions, shipped)")
    p.add_argument("--tokens", type=_positive_int, default=4096, metavar="N",
                   help="tokens of it to decode (default 4096; at most the model's training context)")
    p.add_argument("--n-threads", type=_positive_int, default=None, metavar="N", help="CPU threads")
    p.add_argument("--n-gpu-layers", type=int, default=0, metavar="N", help="layers to offload to a GPU (default 0)")
    p.set_defaults(handler=cmd_calibrate)

    add_commands(sub, IntermixedParser)
    return parser


# ---------------------------------------------------------------------------------------------
# model loading
# ---------------------------------------------------------------------------------------------


def _kv_settings(args: argparse.Namespace) -> KVSettings:
    """The command line's KV settings, refused before the model loads, named as options."""
    if args.n_ctx < 0:
        raise CliError(f"--n-ctx must not be negative, got {args.n_ctx}")
    keep = args.kv_keep_prompt
    if keep is None:
        keep = CHAT_KEEP_PROMPT if args.command == "chat" else 0
    try:
        return KVSettings.from_args(args, kv_keep_prompt=keep)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _resolve(model: str) -> Path:
    from .models import ModelFetchError, resolve_model

    try:
        return resolve_model(model)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    except ModelFetchError as exc:
        raise CliError(f"cannot fetch {model}: {exc}", status=1) from None


def _load(args: argparse.Namespace):
    settings = _kv_settings(args)
    path = _resolve(args.model)
    from . import Llama

    kwargs: Dict[str, Any] = dict(n_ctx=args.n_ctx, verbose=args.verbose, flash_attn=args.flash_attn,
                                  **_device_kwargs(args), **_chat_format_kwargs(args))
    if args.n_threads is not None:
        kwargs.update(n_threads=args.n_threads, n_threads_batch=args.n_threads)
    if getattr(args, "seed", None) is not None:
        kwargs["seed"] = args.seed
    try:
        return Llama(str(path), **kwargs, **settings.to_kwargs())
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None


def _sampling(args: argparse.Namespace) -> Dict[str, Any]:
    if args.max_tokens < 0:
        raise CliError(f"--max-tokens must not be negative, got {args.max_tokens}")
    return dict(max_tokens=args.max_tokens if args.max_tokens > 0 else None, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                seed=args.seed)


# ---------------------------------------------------------------------------------------------
# streaming and the status line
# ---------------------------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _cells_text(stats: Any) -> str:
    if stats.budget is None:
        return f"cells {stats.cells_used} (full cache)"
    return f"cells {stats.cells_used}/{stats.budget + stats.buffer}"


class StatusLine:
    """Tokens, KV cells, compressions and speed on stderr.

    Live when stderr is a terminal: pinned to the bottom row (a scroll region keeps the streamed
    text above it) when stdout is the same terminal, else redrawn in place. Otherwise silent
    until ``finish``, which prints one summary line.
    """

    INTERVAL_S = 0.1

    def __init__(self, llm: Any, err: TextIO = sys.stderr, out: TextIO = sys.stdout, live: Optional[bool] = None) -> None:
        self.llm = llm
        self.err, self.out = err, out
        self.live = _isatty(err) if live is None else live
        self.pinned = self.live and _isatty(out) and os.environ.get("TERM", "") != "dumb"
        self.rows = shutil.get_terminal_size().lines if self.pinned else 0
        if self.rows < 3:
            self.pinned = False
        self._last_draw = 0.0
        self._active = False

    def start(self) -> None:
        if self.pinned:
            # make room for the status row, then confine scrolling to the rows above it
            self.out.flush()
            self.err.write(f"\n\x1b[1A\x1b7\x1b[1;{self.rows - 1}r\x1b8")
            self.err.flush()
        self._active = True

    def text(self, generated: int, rate: Optional[float]) -> str:
        s = self.llm.kv_stats()
        speed = f"{rate:.1f} tok/s" if rate else "- tok/s"
        return (f"tokens {generated} | {_cells_text(s)} | compressions {s.compressions} | {speed}")

    def update(self, generated: int, rate: Optional[float]) -> None:
        if not (self.live and self._active):
            return
        now = time.monotonic()
        if now - self._last_draw < self.INTERVAL_S:
            return
        self._last_draw = now
        line = self.text(generated, rate)
        self.out.flush()
        if self.pinned:
            self.err.write(f"\x1b7\x1b[{self.rows};1H\x1b[2K\x1b[7m{line}\x1b[0m\x1b8")
        else:
            self.err.write(f"\r\x1b[2K{line}")
        self.err.flush()

    def stop(self) -> None:
        if not self._active:
            return
        self._active = False
        if self.live:
            self.out.flush()
            if self.pinned:
                self.err.write(f"\x1b7\x1b[{self.rows};1H\x1b[2K\x1b[r\x1b8")
            else:
                self.err.write("\r\x1b[2K")
            self.err.flush()


@dataclass
class StreamResult:
    text: str
    generated: int
    prompt_tokens: int
    finish_reason: Optional[str]
    seconds: float
    decode_rate: Optional[float]


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _stream(llm: Any, chunks: Iterable[Dict[str, Any]], piece: Callable[[Dict[str, Any]], str],
            status: Optional[StatusLine], out: TextIO, n_prompt: Optional[int] = None) -> StreamResult:
    """Write the text of each chunk to ``out`` as it comes; count tokens from the sequence length.

    ``llm.n_tokens`` is the number of evaluated tokens: the prompt once the first token has been
    sampled, then one more per token fed back. The last sampled token is only evaluated if
    generation continues, so a run cut by max_tokens holds one generated token less than it
    produced, and a run ended by an end-of-generation token holds all of them.
    """
    start = time.monotonic()
    first_at: Optional[float] = None
    parts: List[str] = []
    finish: Optional[str] = None
    generated = 0
    rate: Optional[float] = None
    if status:
        status.start()
    try:
        for chunk in chunks:
            choice = chunk["choices"][0]
            if n_prompt is None:
                n_prompt = llm.n_tokens
            text = piece(choice)
            if text:
                if first_at is None:
                    first_at = time.monotonic()
                parts.append(text)
                out.write(text)
                out.flush()
            generated = max(llm.n_tokens - n_prompt + 1, 0)
            if first_at is not None and generated > 1:
                elapsed = time.monotonic() - first_at
                rate = (generated - 1) / elapsed if elapsed > 0 else None
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
            if status:
                status.update(generated, rate)
    finally:
        if status:
            status.stop()
    if n_prompt is None:
        n_prompt = llm.n_tokens
    generated = max(llm.n_tokens - n_prompt + (0 if finish == "stop" else 1), 0) if finish else generated
    return StreamResult("".join(parts), generated, n_prompt, finish, time.monotonic() - start, rate)


def _summary(llm: Any, result: StreamResult) -> str:
    s = llm.kv_stats()
    rate = f"{result.decode_rate:.1f} tok/s" if result.decode_rate else "- tok/s"
    if s.budget is None:
        kv = f"cells in use {s.cells_used} (full cache)"
    else:
        kept = f"prompt kept {s.cells_kept}, " if s.cells_kept else ""
        kv = (f"cells in use {s.cells_used} (peak {s.cells_peak}, {kept}budget {s.budget} + buffer {s.buffer}, "
              f"{s.method}), compressions {s.compressions}")
    share = f" ({100 * s.kv_bytes_used / s.kv_bytes_full:.0f}%)" if s.kv_bytes_full else ""
    # a sliding-window model's window layers hold their window apart, with or without a budget
    window = f" + {_human_bytes(s.kv_bytes_window)} in the window layers" if s.kv_bytes_window else ""
    # a chat's next turn evaluates only what the cache did not hold
    evaluated = (f", {s.prompt_tokens_evaluated} evaluated" if s.prompt_tokens_evaluated < s.prompt_tokens else "")
    return (f"{PROG}: tokens {result.generated} (prompt {result.prompt_tokens}{evaluated}), {kv}, "
            f"{rate}, KV {_human_bytes(s.kv_bytes_used)} of {_human_bytes(s.kv_bytes_full)} for a full cache{share}{window}, "
            f"finish {result.finish_reason or '-'}, {result.seconds:.1f} s")


def _eog_bias(llm: Any) -> Dict[int, float]:
    import llama_cpp

    vocab = llm._model.vocab
    return {t: float("-inf") for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if _isatty(sys.stdin):
        sys.stderr.write("reading the prompt from stdin; end it with Ctrl-D\n")
        sys.stderr.flush()
    return sys.stdin.read()


def _messages(system: Optional[str], user: str) -> List[Dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def has_chat_template(llm: Any) -> bool:
    return bool(llm.metadata.get("tokenizer.chat_template"))


def _start_stream(llm: Any, args: argparse.Namespace, prompt: str, sampling: Dict[str, Any]
                  ) -> tuple[Iterable[Dict[str, Any]], Callable[[Dict[str, Any]], str], Optional[int]]:
    """Stream chunks for PROMPT, the text of one chunk, and the prompt's length when known up front.

    A model that ships a chat template gets PROMPT as a user message, unless ``--raw``.
    """
    system = getattr(args, "system", None)
    if not args.raw and has_chat_template(llm):
        chunks = llm.create_chat_completion(messages=_messages(system, prompt), stream=True, **sampling)
        return chunks, lambda choice: choice["delta"].get("content") or "", None
    if system:
        raise CliError("--system needs the chat template: drop --raw" if args.raw
                       else f"--system needs a chat template, and {args.model} has none")
    if prompt:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    else:
        bos = llm.token_bos()
        if bos < 0:
            raise CliError("empty prompt and the model has no BOS token to start from")
        tokens = [bos]
    chunks = llm.create_completion(tokens, stream=True, **sampling)
    return chunks, lambda choice: choice.get("text") or "", len(tokens)


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate

    if not args.out.endswith(".npz"):
        raise CliError(f"--out must name a .npz file, got {args.out}")
    text = None
    if args.data is not None:
        try:
            text = Path(args.data).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"cannot read --data {args.data}: {exc}") from None
    path = _resolve(args.model)
    threads = dict(n_threads=args.n_threads, n_threads_batch=args.n_threads) if args.n_threads else {}
    try:
        made = calibrate(path, text=text, n_tokens=args.tokens, n_gpu_layers=args.n_gpu_layers, **threads)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    made.save(args.out)
    print(f"{args.out}: {len(made.layers)} layers calibrated on {made.n_tokens} tokens", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    prompt = _read_prompt(args)
    with closing(_load(args)) as llm:
        if args.ignore_eos:
            sampling["logit_bias"] = _eog_bias(llm)
        chunks, piece, n_prompt = _start_stream(llm, args, prompt, sampling)
        status = StatusLine(llm)
        result = _stream(llm, chunks, piece, status, sys.stdout, n_prompt=n_prompt)
        if result.text and not result.text.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        print(_summary(llm, result), file=sys.stderr)
        return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    interactive = _isatty(sys.stdin)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: List[Dict[str, str]] = list(system)
    color = _isatty(sys.stdout) and not os.environ.get("NO_COLOR")
    with closing(_load(args)) as llm:
        llm.warn_chat_format_fallback()   # before the first turn, not after it
        if interactive:
            sys.stderr.write(f"{PROG} chat: {args.model}; /exit or Ctrl-D quits, /reset forgets the conversation\n")
        while True:
            try:
                line = input("> ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and line == "":
                break  # end of input
            line = line.rstrip("\r\n")
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = list(system)
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            chunks = llm.create_chat_completion(messages=history, stream=True, reasoning_format="deepseek", **sampling)
            shown = ThinkingShown(dim=color)
            result = _stream(llm, chunks, shown, None, sys.stdout)
            sys.stdout.write(shown.close() + "\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": shown.answer})
            print(_summary(llm, result) + shown.summary(llm), file=sys.stderr)
        if interactive:
            sys.stderr.write("\n")
        return 0


class ThinkingShown:
    """How `chat` shows a reasoning model's answer: the thinking dimmed in a terminal (between <think>
    and </think> elsewhere), then the answer; counts the thinking's tokens."""

    DIM, NORMAL = "\x1b[2m", "\x1b[0m"

    def __init__(self, dim: bool) -> None:
        self.dim = dim
        self.thinking_tokens = 0
        self.answer = ""
        self._in_thinking = False

    def __call__(self, choice: Dict[str, Any]) -> str:
        delta = choice.get("delta") or {}
        out = ""
        reasoning, content = delta.get("reasoning_content"), delta.get("content")
        if reasoning:
            if not self._in_thinking:
                self._in_thinking = True
                out += self.DIM if self.dim else "<think>"
            self.thinking_tokens += 1
            out += reasoning
        if content:
            out += self.close()
            self.answer += content
            out += content
        return out

    def close(self) -> str:
        """What ends the thinking's look, if it is still open."""
        if not self._in_thinking:
            return ""
        self._in_thinking = False
        return self.NORMAL + "\n" if self.dim else "</think>\n"

    def summary(self, llm: Any) -> str:
        if not self.thinking_tokens:
            return ""
        s = llm.kv_stats()
        kept = f", the cache keeps {s.cells_used} cells of it all" if s.budget is not None else ""
        return f"; thinking {self.thinking_tokens} tokens{kept}"


def cmd_inspect(args: argparse.Namespace) -> int:
    import llama_cpp

    from .inspect_view import collect, render_html, render_terminal, shown_layers

    sampling = _sampling(args)
    with closing(_load(args)) as llm:
        if args.ignore_eos:
            sampling["logit_bias"] = _eog_bias(llm)
        n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(llm.model))
        layers = shown_layers(llm)
        if args.layer is None:
            args.layer = layers[0]
        if not 0 <= args.layer < n_layer:
            raise CliError(f"--layer {args.layer} is out of range: the model has layers 0..{n_layer - 1}")
        if args.layer not in layers:
            raise CliError(f"--layer {args.layer} is a sliding-window layer, which keeps llama.cpp's window: "
                           f"the budget compresses layers {', '.join(map(str, layers))}")
        for h in args.head or []:
            if not 0 <= h < n_head_kv:
                raise CliError(f"--head {h} is out of range: the model has KV heads 0..{n_head_kv - 1}")
        chunks, piece, n_prompt = _start_stream(llm, args, args.prompt, sampling)
        result = _stream(llm, chunks, piece, None, _NullWriter(), n_prompt=n_prompt)
        notes = ["the last generated token is not shown: it was sampled but never fed back, so no cache holds it"
                 ] if result.finish_reason == "length" else []
        if args.compress_now and llm.kv_config is not None:
            if llm.compress_now():
                notes.append("compressed once more after generating (--compress-now)")
        s = llm.kv_stats()
        settings = (f"method {s.method}, budget {s.budget}, buffer {s.buffer}, window {llm.kv_config.window}, "
                    f"lambda {llm.kv_config.lam}" if llm.kv_config else "full cache (no --kv-budget)")
        stats_line = (f"cells in use {s.cells_used} (peak {s.cells_peak}), compressions {s.compressions}, "
                      f"evicted {s.evicted_tokens} per head")
        data = collect(llm, Path(args.model).name, settings, result.prompt_tokens, stats_line)
        data.notes = notes
        color = args.color == "always" or (args.color == "auto" and _isatty(sys.stdout) and not os.environ.get("NO_COLOR"))
        sys.stdout.write(render_terminal(data, layer=args.layer, heads=args.head, color=color))
        if args.html:
            Path(args.html).write_text(render_html(data), encoding="utf-8")
            print(f"{PROG}: wrote {args.html} ({len(layers)} layers x {n_head_kv} KV heads)", file=sys.stderr)
        return 0


class _NullWriter:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _kv_settings(args)
    try:
        from . import server
    except ImportError as exc:
        raise CliError(str(exc), status=1) from None
    import uvicorn

    from . import BatchedLlama

    path = _resolve(args.model)
    # flash attention stays on whatever --flash-attn says (BatchedLlama's default): without it llama.cpp
    # gives a request other logits when other requests share its decode calls
    kwargs: Dict[str, Any] = dict(n_seq_max=args.parallel, n_ctx=args.n_ctx, verbose=args.verbose,
                                  **_device_kwargs(args), **settings.to_kwargs())
    kwargs.update(_chat_format_kwargs(args))
    if args.n_threads is not None:
        kwargs.update(n_threads=args.n_threads, n_threads_batch=args.n_threads)
    if args.seed is not None:
        kwargs["seed"] = args.seed
    try:
        llm = BatchedLlama(str(path), **kwargs)
    except ValueError as exc:
        raise CliError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
    llm.warn_chat_format_fallback()   # at start: the server's chat requests would otherwise say it in its log
    alias = args.model_alias or args.model
    app = server.create_app(llm, model_alias=alias, api_key=args.api_key, shutdown_timeout_s=args.shutdown_timeout,
                            max_queue=args.max_queue, reasoning_format=args.reasoning_format)
    budget = (f"kv budget {args.kv_budget} + buffer {args.kv_buffer} ({args.kv_method})"
              if args.kv_budget is not None else "full KV cache")
    print(f"{PROG}: serving {alias} with {budget}, {args.parallel} request(s) at a time, "
          f"on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            server.begin_shutdown(app)   # new requests: 503; running ones: until --shutdown-timeout
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            timeout_graceful_shutdown=args.shutdown_timeout + 5)
    # uvicorn raises the signal again once it has stopped; here it has been handled: exit 0
    handled = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(config).run()
    finally:
        for sig, handler in handled.items():
            signal.signal(sig, handler)
        if server.drain(app):  # a request thread still inside the model would crash on a closed one
            llm.close()
    return 0


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    # a user-facing line, as the CLI's errors are, not Python's file:line report
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")  # token text must never crash the output
        except (AttributeError, ValueError):
            pass
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.handler(args) or 0)
    except CliError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except ConnectionError as exc:   # an --rpc server that does not answer, or went away
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
