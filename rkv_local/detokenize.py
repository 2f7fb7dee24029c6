"""Detokenization at the cost of the new tokens: what a completion loop asks for at every token.

llama-cpp-python's ``_create_completion`` detokenizes the whole completion after each token (to
find stop strings and incomplete UTF-8 characters): O(n) calls into llama.cpp per token, O(n²)
per answer, so a long reasoning trace streams ever slower although the KV cache does not grow.

With llama.cpp's vocabularies a token's piece does not depend on its neighbours
(``llama_token_to_piece`` without ``lstrip``): the text of a token list is the concatenation of its
pieces, less one leading space when the list starts with BOS (llama-cpp-python's rule for Llama-1
style vocabularies). ``Detokenizer`` therefore looks each piece up once and remembers the last long
list it was asked for, with the byte offset where each of its tokens ends: a list that extends it
(the completion one token later) costs its new tokens, a prefix of it costs nothing, plus one
comparison of the lists (in C). The bytes are those of llama-cpp-python's ``LlamaModel.detokenize``,
except that a piece longer than its 32-byte buffer is kept whole instead of dropped.
"""
from __future__ import annotations

import codecs
import ctypes
import operator
from typing import Dict, List, Sequence

import llama_cpp

# shorter lists are joined from the piece table and leave the remembered list alone: the loop asks
# for a token or two at a time between its calls for the whole completion
REMEMBER_MIN_TOKENS = 16


class CompletionBytes(bytes):
    """Bytes given to llama-cpp-python's completion loop, whose strict ``decode`` fails only on an
    incomplete last character.

    The loop's stream step decodes ever longer runs of the tokens not yet sent, strictly, until one
    decodes: that holds back a character split across tokens. A byte sequence that can never decode
    (a character cut short and followed by another one, which a model can write) then holds back the
    rest of the stream until the end, and every later token retries every run: O(n) decodes per
    token. Here invalid bytes are dropped, as the loop's final ``decode(errors="ignore")`` drops them,
    so the stream goes on and its chunks join to the completion's text. The bytes themselves (their
    lengths and offsets, which the loop uses for stop strings) are llama-cpp-python's.
    """

    __slots__ = ()

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        if errors != "strict" or codecs.lookup(encoding).name != "utf-8":
            return super().decode(encoding, errors)
        try:
            return super().decode(encoding)
        except UnicodeDecodeError:
            pass
        decoder = codecs.getincrementaldecoder("utf-8")("ignore")
        text = decoder.decode(self, final=False)
        incomplete = decoder.getstate()[0]
        if incomplete:
            raise UnicodeDecodeError("utf-8", bytes(self), len(self) - len(incomplete), len(self),
                                     "unexpected end of data")
        return text


class PieceTable:
    """Each token's bytes, asked of llama.cpp once per token; shared by every detokenizer of a model."""

    def __init__(self, model: "llama_cpp._internals.LlamaModel") -> None:
        self._model = model
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(model.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(model.vocab))
        self._pieces: tuple[Dict[int, bytes], Dict[int, bytes]] = ({}, {})   # special=False, special=True

    def piece(self, token: int, special: bool) -> bytes:
        pieces = self._pieces[special]
        piece = pieces.get(token)
        if piece is None:
            piece = pieces[token] = self._ask(token, special)
        return piece

    def _ask(self, token: int, special: bool) -> bytes:
        token = operator.index(token)   # a float or a string is no token (llama-cpp-python: ctypes' TypeError)
        if not 0 <= token < self.n_vocab:
            # llama.cpp would abort the process on an id outside its vocabulary
            raise ValueError(f"token id {token} is outside the vocabulary (0 to {self.n_vocab - 1})")
        size = 32
        while True:
            # a buffer of its own: requests of several threads may look pieces up at once
            buffer = (ctypes.c_char * size)()
            n = llama_cpp.llama_token_to_piece(self._model.vocab, llama_cpp.llama_token(token), buffer, size, 0,
                                               special)
            if n >= 0:
                return bytes(buffer[:n])
            size = -n


class Detokenizer:
    """``detokenize(tokens, special)`` of one token stream (one ``Llama``, or one request of a batch)."""

    def __init__(self, pieces: PieceTable) -> None:
        self.pieces = pieces
        self._tokens: List[int] = []    # the remembered list (a copy)
        self._text = bytearray()        # its pieces, concatenated
        self._ends: List[int] = []      # where each of its tokens ends in _text
        self._special = False

    def fork(self) -> "Detokenizer":
        """A detokenizer for another stream, sharing the piece table."""
        return Detokenizer(self.pieces)

    def __call__(self, tokens: Sequence[int], special: bool = False, completion: bool = False) -> bytes:
        """The bytes of ``tokens``; ``completion``: as ``CompletionBytes``, for the completion loop."""
        if not isinstance(tokens, list):
            tokens = list(tokens)
        special = bool(special)
        kind = CompletionBytes if completion else bytes
        if len(tokens) < REMEMBER_MIN_TOKENS:
            text = kind(b"".join([self.pieces.piece(token, special) for token in tokens]))
        else:
            text = self._remembered(tokens, special, kind)
        if text[:1] == b" " and tokens[0] == self.pieces.bos:
            return kind(text[1:])
        return text

    def _remembered(self, tokens: List[int], special: bool, kind: type) -> bytes:
        n, k = len(tokens), len(self._tokens)
        if special == self._special and k:
            if n == k and tokens == self._tokens:
                return kind(self._text)
            if n > k and tokens[:k] == self._tokens:
                self._extend(tokens[k:], special)
                return kind(self._text)
            if n < k and tokens == self._tokens[:n]:
                return kind(self._text[:self._ends[n - 1]])
        self._tokens, self._text, self._ends, self._special = [], bytearray(), [], special
        self._extend(tokens, special)
        return kind(self._text)

    def _extend(self, tokens: List[int], special: bool) -> None:
        pieces = [self.pieces.piece(token, special) for token in tokens]   # may refuse a token: nothing changed yet
        for piece in pieces:
            self._text += piece
            self._ends.append(len(self._text))
        self._tokens.extend(tokens)
