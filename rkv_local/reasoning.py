"""Reasoning models: where the thinking ends, and the thinking apart from the answer.

``ThinkingWatch`` tells ``Llama`` when a generation writes its end-of-thinking marker
(``kv_compress="think"``). ``ReasoningSplitter``, ``split_message`` and ``split_stream`` give chat completions
llama.cpp's ``--reasoning-format deepseek`` form: the text between ``<think>`` and ``</think>`` in
``message.reasoning_content`` (streamed as ``delta.reasoning_content``), the rest in ``content``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from llama_cpp import llama_chat_format

from .detokenize import PieceTable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# gpt-oss writes its thinking in the analysis channel, then the answer in the final one
GPT_OSS_FINAL = "<|channel|>final<|message|>"

REASONING_FORMATS = ("none", "deepseek")


def think_end_marker(chat_template: str) -> Optional[str]:
    """The end-of-thinking marker a chat template uses (``</think>``, gpt-oss's final channel), if any."""
    if GPT_OSS_FINAL in chat_template:
        return GPT_OSS_FINAL
    if THINK_CLOSE in chat_template:
        return THINK_CLOSE
    return None


@dataclass
class ThinkingWatch:
    """Finds the end-of-thinking marker in the text of generated tokens (whatever tokens spell it)."""

    marker: str
    piece: Callable[[int], bytes]   # a token's bytes, special tokens spelled out

    @classmethod
    def for_model(cls, llm: Any, marker: Optional[str]) -> "ThinkingWatch":
        if marker is None:
            marker = think_end_marker(llm.metadata.get("tokenizer.chat_template", ""))
            if marker is None:
                raise ValueError(
                    "kv_compress='think': the model's chat template names no end of thinking (</think>, "
                    "gpt-oss's final channel); give the marker with kv_think_end")
        if not marker:
            raise ValueError("kv_think_end must not be empty")
        pieces = PieceTable(llm._model)
        return cls(marker, lambda token: pieces.piece(token, True))

    def start(self) -> Callable[[int], bool]:
        """A watch over one generation: called with each token, True for the token that ends the marker."""
        wanted = self.marker.encode()
        tail = bytearray()
        seen = False

        def watch(token: int) -> bool:
            nonlocal seen
            if seen:
                return False
            tail.extend(self.piece(token))
            del tail[:-len(wanted) - 64]
            seen = wanted in tail
            return seen

        return watch


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (it may complete in the next chunk)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReasoningSplitter:
    """Splits streamed answer text into (reasoning, content) as llama.cpp's deepseek format does.

    ``thinking`` is True when the prompt already opened the thinking (a template that ends its
    generation prompt with ``<think>``); otherwise a ``<think>`` at the start of the text opens it.
    Text that may be the start of a marker is held until the next chunk decides.
    """

    thinking: bool = False
    _started: bool = False
    _held: str = ""
    _after_close: bool = False
    reasoning: List[str] = field(default_factory=list)
    content: List[str] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, str]:
        text = self._held + text
        self._held = ""
        reasoning, content = [], []
        while text:
            if not self._started:
                stripped = text.lstrip()
                if not self.thinking and THINK_OPEN.startswith(stripped):
                    self._held = text   # all of it may still be "<think>": wait
                    break
                self._started = True
                if not self.thinking and stripped.startswith(THINK_OPEN):
                    self.thinking = True
                    text = stripped[len(THINK_OPEN):]
                continue
            if self.thinking:
                at = text.find(THINK_CLOSE)
                if at < 0:
                    keep = _partial_suffix(text, THINK_CLOSE)
                    reasoning.append(text[:len(text) - keep])
                    self._held = text[len(text) - keep:]
                    break
                reasoning.append(text[:at])
                text = text[at + len(THINK_CLOSE):]
                self.thinking, self._after_close = False, True
                continue
            if self._after_close:   # the answer starts after the blank the template puts after </think>
                text = text.lstrip()
                if not text:
                    break
                self._after_close = False
            content.append(text)
            break
        out = "".join(reasoning), "".join(content)
        self.reasoning.append(out[0])
        self.content.append(out[1])
        return out

    def finish(self) -> tuple[str, str]:
        """What was held back at the end of the text."""
        held, self._held = self._held, ""
        if not held:
            return "", ""
        out = (held, "") if self.thinking else ("", held.lstrip() if self._after_close else held)
        self.reasoning.append(out[0])
        self.content.append(out[1])
        return out


def thinking_open_in_prompt(llm: Any, messages: List[Dict[str, Any]], **kwargs: Any) -> bool:
    """Whether the model's own chat template (GGUF metadata) leaves the thinking open at the end of
    the prompt of ``messages``, as DeepSeek-R1's and Qwen3's templates do: the answer then begins
    inside the thinking, without a ``<think>`` of its own."""
    name = llm.chat_format or ""
    if llm.chat_handler is not None or not name.startswith("chat_template."):
        return False
    key = "tokenizer.chat_template" + name[len("chat_template.default"):] if name == "chat_template.default" \
        else "tokenizer." + name
    template = llm.metadata.get(key)
    if not template or THINK_OPEN not in template:
        return False
    text = lambda token: llm._model.token_get_text(token) if token != -1 else ""  # noqa: E731
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))
    try:
        prompt = formatter(messages=messages, **kwargs).prompt
    except Exception:   # a template that needs what this request lacks: llama-cpp-python will say so
        return False
    return prompt.rstrip().endswith(THINK_OPEN)


def split_message(response: Dict[str, Any], thinking: bool) -> Dict[str, Any]:
    """A chat completion with each message's thinking moved to ``reasoning_content``."""
    for choice in response.get("choices", []):
        message = choice.get("message") or {}
        text = message.get("content")
        if not isinstance(text, str):
            continue
        splitter = ReasoningSplitter(thinking=thinking)
        splitter.feed(text)
        splitter.finish()
        reasoning = "".join(splitter.reasoning)
        message["content"] = "".join(splitter.content)
        message["reasoning_content"] = reasoning or None
    return response


def split_stream(chunks: Iterator[Dict[str, Any]], thinking: bool) -> Iterator[Dict[str, Any]]:
    """Chat completion chunks with the thinking in ``delta.reasoning_content``."""
    splitters: Dict[int, ReasoningSplitter] = {}
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            splitter = splitters.setdefault(choice.get("index", 0), ReasoningSplitter(thinking=thinking))
            text = delta.get("content")
            if isinstance(text, str):
                reasoning, content = splitter.feed(text)
            elif choice.get("finish_reason") is not None:
                reasoning, content = splitter.finish()
                if not reasoning and not content:
                    continue
            else:
                continue
            delta.pop("content", None)
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content:
                delta["content"] = content
        yield chunk
