"""Decoding steps the evaluations take below ``Llama``'s generation API: greedy tokens, the logits
of every position, end-of-generation tokens, and the model's chat template as text and tokens."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .. import Llama, llama_cpp
from .report import log

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
    """The model's own chat template (GGUF metadata), rendered to text and tokens. A base model without
    one (Gemma 3 270M) gets plain text: the messages' contents, each followed by a blank line."""

    def __init__(self, llm: Llama) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llm = llm
        self._formatter = None
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            log("the model has no chat template: its prompts are plain text")
            return
        eos, bos = llm.token_eos(), llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        )

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation with the assistant's generation prompt appended."""
        if self._formatter is None:
            return "".join(f"{m['content']}\n\n" for m in messages)
        return self._formatter(messages=messages).prompt

    def tokens(self, text: str) -> list[int]:
        # as llama-cpp-python's chat handlers do: the template writes BOS itself where it wants one
        return self._llm.tokenize(text.encode("utf-8"), add_bos=self._formatter is None, special=True)
