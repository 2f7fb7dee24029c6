"""Checks of sampling settings that llama-cpp-python hands to llama.cpp unchecked.

Both failures are silent or fatal there: a grammar llama.cpp cannot parse gives a NULL sampler that
the first sample dereferences (the process dies), and a ``logit_bias`` key that is no token id
raises inside a sampler callback, where the error is printed and swallowed (every bias of the
request is dropped; a negative id biases the vocabulary's end). ``Llama``, ``BatchedLlama`` and the
server refuse them with a ``ValueError`` before anything is decoded.
"""
from __future__ import annotations

from typing import Any, Mapping

import llama_cpp

__all__ = ["check_grammar", "check_logit_bias"]


def check_logit_bias(logit_bias: Mapping[Any, float], n_vocab: int) -> None:
    """Refuse a key that is not a token id of the model (ints, or their decimal strings)."""
    for key in logit_bias:
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        if not 0 <= token < n_vocab:
            raise ValueError(f"logit_bias: {key!r} is not a token id of this model (0 to {n_vocab - 1})")


def check_grammar(vocab: Any, grammar: llama_cpp.LlamaGrammar) -> None:
    """Refuse a GBNF grammar llama.cpp cannot parse (``vocab``: the model's ``llama_vocab`` pointer)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"),
                                                   grammar._root.encode("utf-8"))
    if not sampler:
        raise ValueError(f"grammar: llama.cpp refused this GBNF grammar (a syntax error, an undefined or "
                         f"left-recursive rule, or no rule named {grammar._root!r})")
    llama_cpp.llama_sampler_free(sampler)
