"""The completion loop at the cost of the new tokens (issue 20): ``rkv_local.detokenize`` gives the
bytes of llama-cpp-python 0.3.36's own detokenization, and completions through it equal llama-cpp-python's
own loop chunk for chunk.

Three vocabularies: SmolLM2's and Qwen2's (byte-level BPE; Qwen2's from the vocabulary file of the
llama.cpp tree the library was built from) and Llama's SentencePiece one with byte fallback (a
leading space dropped after BOS). End to end, the same token stream is forced on ``rkv_local.Llama``
and on llama-cpp-python's own ``Llama`` by a logits processor, so only the loops differ.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import codecs

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkv_local import BatchedLlama, Llama, _library
from rkv_local.detokenize import REMEMBER_MIN_TOKENS, CompletionBytes, Detokenizer, PieceTable
import llama_cpp

THREADS = dict(n_threads=1, n_threads_batch=1, verbose=False)
LONG_PIECE = 32   # llama-cpp-python's piece buffer: it drops longer pieces (whitespace runs)


def llama_source_file(name: str) -> Path:
    path = Path(_library.build_info()["llama_source"]) / "models" / name
    if not path.exists():
        pytest.skip(f"{path} is gone (the llama.cpp tree the library was built from was removed)")
    return path


@pytest.fixture(scope="module", params=["smollm2", "qwen2", "llama-spm"])
def vocab(request, smollm2_path: Path) -> Iterator[Llama]:
    path = smollm2_path if request.param == "smollm2" else llama_source_file(f"ggml-vocab-{request.param}.gguf")
    llm = Llama(path, vocab_only=True, n_ctx=64, **THREADS)
    yield llm
    llm.close()


def stock_detokenize(llm: llama_cpp.Llama, tokens: Sequence[int], special: bool = False) -> bytes:
    """llama-cpp-python's own detokenization (its LlamaTokenizer)."""
    return llama_cpp.Llama.detokenize(llm, list(tokens), special=special)


class VocabFacts:
    """Tokens worth drawing often, and the long pieces llama-cpp-python cannot return."""

    def __init__(self, llm: Llama) -> None:
        table = PieceTable(llm._model)
        pieces = [table.piece(t, True) for t in range(table.n_vocab)]
        self.n_vocab, self.bos = table.n_vocab, table.bos
        self.long = {t for t, p in enumerate(pieces) if len(p) > LONG_PIECE}
        self.bytes = [t for t, p in enumerate(pieces) if len(p) == 1 and p[0] >= 0x80]   # parts of a character
        self.spaced = [t for t, p in enumerate(pieces) if p[:1] == b" "][:200]
        self.by_byte = {p: t for t, p in enumerate(pieces) if len(p) == 1}
        self.whole = {t for t, p in enumerate(pieces) if whole_characters(p)}
        self.special = [t for t in range(self.n_vocab)
                        if llama_cpp.llama_vocab_get_attr(llm._model.vocab, t) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL]


def whole_characters(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_facts: Dict[str, VocabFacts] = {}


def facts_of(llm: Llama) -> VocabFacts:
    if llm.model_path not in _facts:
        _facts[llm.model_path] = VocabFacts(llm)
    return _facts[llm.model_path]


def token_lists(facts: VocabFacts, min_size: int = 0, max_size: int = 60) -> st.SearchStrategy[List[int]]:
    plain = st.integers(0, facts.n_vocab - 1).filter(lambda t: t not in facts.long)
    token = st.one_of(plain, st.sampled_from(facts.bytes or [0]), st.sampled_from(facts.spaced or [0]),
                      st.sampled_from(facts.special or [0]))
    body = st.lists(token, min_size=min_size, max_size=max_size)
    return st.one_of(body, body.map(lambda ts: [facts.bos] + ts if facts.bos >= 0 else ts))


# ---------------------------------------------------------------------------
# the detokenizer against llama-cpp-python's
# ---------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_call_sequence_gives_llama_cpp_pythons_bytes(vocab: Llama, data: st.DataObject) -> None:
    """Lists that grow a token or many at a time, prefixes, unrelated lists and short ones in between,
    with and without special tokens: each answer is llama-cpp-python's."""
    facts = facts_of(vocab)
    detokenizer = Detokenizer(PieceTable(vocab._model))
    current = data.draw(token_lists(facts))
    for _ in range(data.draw(st.integers(1, 12))):
        special = data.draw(st.booleans())
        got = detokenizer(current, special)
        assert got == stock_detokenize(vocab, current, special), current
        step = data.draw(st.sampled_from(["grow", "grow", "grow", "prefix", "fresh", "short"]))
        if step == "grow":
            current = current + data.draw(token_lists(facts, 1, 3 if data.draw(st.booleans()) else 40))
        elif step == "prefix" and current:
            current = current[:data.draw(st.integers(0, len(current)))]
        elif step == "fresh":
            current = data.draw(token_lists(facts))
        else:   # a short list in between leaves the remembered one alone
            short = data.draw(token_lists(facts, 0, REMEMBER_MIN_TOKENS - 1))
            assert detokenizer(short, special) == stock_detokenize(vocab, short, special)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=24) | st.text(max_size=8).map(str.encode))
def test_completion_bytes_decode_strictly_only_an_incomplete_last_character(data: bytes) -> None:
    """The completion loop's strict decode: invalid bytes dropped as errors="ignore" drops them, an
    incomplete last character still an error (the loop holds it back); other decodes unchanged."""
    wrapped = CompletionBytes(data)
    assert wrapped == data and len(wrapped) == len(data)
    assert wrapped.decode("utf-8", errors="ignore") == data.decode("utf-8", errors="ignore")
    assert wrapped.decode("utf-8", "replace") == data.decode("utf-8", "replace")
    decoder = codecs.getincrementaldecoder("utf-8")("ignore")
    ignored = decoder.decode(data, final=False)
    if decoder.getstate()[0]:
        with pytest.raises(UnicodeDecodeError, match="unexpected end of data"):
            wrapped.decode()
    else:
        assert wrapped.decode() == wrapped.decode("UTF8") == ignored == data.decode("utf-8", errors="ignore")
    try:
        assert wrapped.decode() == data.decode()   # valid UTF-8: as before
    except UnicodeDecodeError:
        pass


def test_a_completion_growing_token_by_token_costs_its_new_tokens(vocab: Llama) -> None:
    facts = facts_of(vocab)
    rng = np.random.default_rng(5)
    draw = lambda: int(rng.choice(facts.bytes + facts.spaced))  # noqa: E731
    tokens = ([facts.bos] if facts.bos >= 0 else []) + [draw() for _ in range(2 * REMEMBER_MIN_TOKENS)]
    table = PieceTable(vocab._model)
    detokenizer = Detokenizer(table)
    detokenizer(tokens)
    asked: List[int] = []
    table.piece = lambda token, special, _piece=table.piece: asked.append(token) or _piece(token, special)
    for _ in range(600):
        tokens.append(draw())
        text = detokenizer(tokens)
        assert detokenizer(tokens[:-7]) == stock_detokenize(vocab, tokens[:-7])   # a prefix: nothing to join
    assert text == stock_detokenize(vocab, tokens)
    # each new token joined once (llama-cpp-python joins 34 + 35 + ... + 633 pieces, 200,000)
    assert len(asked) == 600


def test_other_sequences_numpy_arrays_and_bos_rules(vocab: Llama) -> None:
    facts = facts_of(vocab)
    tokens = [facts.bos] + facts.spaced[:20] if facts.bos >= 0 else facts.spaced[:21]
    for given_as in (tokens, tuple(tokens), np.array(tokens, dtype=np.intc), iter(tokens)):
        assert vocab.detokenize(given_as) == stock_detokenize(vocab, tokens)
    assert vocab.detokenize([]) == b""
    # the leading space after BOS goes (SentencePiece's "▁word"), only there
    assert vocab.detokenize(tokens[1:]) == stock_detokenize(vocab, tokens[1:])


def test_a_piece_longer_than_llama_cpp_pythons_buffer_is_kept_whole(smollm2_path: Path) -> None:
    """llama-cpp-python 0.3.36 drops pieces of more than 32 bytes: a newline with deep indentation
    vanishes from generated code. Ours keeps them (llama.cpp's own piece)."""
    llm = Llama(smollm2_path, vocab_only=True, n_ctx=64, **THREADS)
    try:
        code = b"def f():\n    if x:\n        if y:\n            if z:\n                if w:\n" \
               b"                                    return 1\n"
        tokens = llm.tokenize(code, add_bos=False)
        long = [t for t in tokens if len(PieceTable(llm._model).piece(t, False)) > LONG_PIECE]
        assert long, "the sample has no long whitespace token: pick another"
        assert llm.detokenize(tokens) == code
        assert stock_detokenize(llm, tokens) != code   # the defect this fixes
    finally:
        llm.close()


def test_a_token_outside_the_vocabulary_is_a_clear_error(vocab: Llama) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.detokenize([1, vocab.n_vocab()])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.detokenize([-5])
    with pytest.raises(TypeError):
        vocab.detokenize([1.5])
    assert vocab.detokenize([1, 2]) == stock_detokenize(vocab, [1, 2])   # nothing half remembered


# ---------------------------------------------------------------------------
# completions end to end: the same token stream through both loops
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["smollm2", "qwen2"])
def tiny_vocab_model(request, tiny_model) -> str:
    if request.param == "smollm2":
        return str(tiny_model(arch="llama"))
    return str(tiny_model(arch="llama", n_head=2, n_head_kv=1, head_dim=16,
                          vocab_from=llama_source_file("ggml-vocab-qwen2.gguf")))


@pytest.fixture(scope="module")
def pair(tiny_vocab_model: str) -> Iterator[tuple[Llama, llama_cpp.Llama, VocabFacts]]:
    ours = Llama(tiny_vocab_model, n_ctx=512, logits_all=True, **THREADS)
    stock = llama_cpp.Llama(tiny_vocab_model, n_ctx=512, logits_all=True, **THREADS)
    yield ours, stock, facts_of(ours)
    ours.close()
    stock.close()


def forcing(script: Sequence[int], end: int) -> llama_cpp.LogitsProcessorList:
    """Makes the n-th sampled token ``script[n]`` (greedy), then ``end``."""
    step = [0]

    def force(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        token = script[step[0]] if step[0] < len(script) else end
        step[0] += 1
        scores[:] = -np.inf
        scores[token] = 0.0
        return scores

    return llama_cpp.LogitsProcessorList([force])


def without_ids(result: Any) -> Any:
    """A completion (or its chunks) less what differs between two calls: id and creation time."""
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if k not in ("id", "created")}
    return [without_ids(chunk) for chunk in result]


def complete(llm: Any, script: Sequence[int], end: int, **kwargs: Any) -> Any:
    if isinstance(llm, llama_cpp.Llama):
        # the prompt evaluated afresh: logprobs of a prompt reused from the cache carry the rounding of
        # the decode that made them, which depends on what the instance did before
        llm.reset()
    out = llm.create_completion(temperature=0.0, logits_processor=forcing(script, end), **kwargs)
    return without_ids(out if not kwargs.get("stream") else list(out))


def character_split(facts: VocabFacts, text: str) -> List[int]:
    """``text`` as single-byte tokens: each multi-byte character split over several tokens."""
    return [facts.by_byte[bytes([b])] for b in text.encode("utf-8")]


def scripts(llm: Llama, facts: VocabFacts) -> Dict[str, List[int]]:
    rng = np.random.default_rng(11)
    words = llm.tokenize("The answer is 42, naïve café: 東京 ✅ done.\nNext line".encode(), add_bos=False)
    # tokens of whole characters: random parts of characters would make invalid UTF-8, where the
    # streams differ on purpose (test_a_stream_goes_on_after_invalid_utf8)
    plain = [int(t) for t in rng.choice(sorted(facts.whole - facts.long - set(facts.special)
                                               - set(eog_of(llm))), 60)]
    split = character_split(facts, "é ✅ 東京 🎉!")
    return {
        "words": words * 3,
        "random": plain,
        "split characters": words[:5] + split + words[5:] + split,
        "ends inside a character": words[:4] + split[:-3],   # 🎉 cut after 2 of its 4 bytes
    }


def eog_of(llm: Llama) -> List[int]:
    vocab = llm._model.vocab
    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_equal_llama_cpp_pythons_loop(pair, stream: bool) -> None:
    ours, stock, facts = pair
    eos = eog_of(ours)[0]
    prompt = ours.tokenize(b"Once upon a time", add_bos=False)
    for name, script in scripts(ours, facts).items():
        text = stock_detokenize(ours, script)
        cases = [
            dict(max_tokens=len(script)),                        # "length", possibly inside a character
            dict(max_tokens=len(script) + 5),                    # the end token: "stop"
            dict(max_tokens=len(script) // 2),
        ]
        # stop strings straddling tokens, of one and several bytes, and one never written
        for cut in (len(text) // 3, len(text) // 2, 2 * len(text) // 3):
            for width in (1, 3, 8):
                stop = text[cut:cut + width].decode("utf-8", errors="ignore")
                if stop:
                    cases.append(dict(max_tokens=len(script) + 5, stop=[stop, "never written"]))
        cases.append(dict(max_tokens=len(script) + 5, stop="never written"))
        for kwargs in cases:
            expected = complete(stock, script, eos, prompt=prompt, stream=stream, **kwargs)
            assert complete(ours, script, eos, prompt=prompt, stream=stream, **kwargs) == expected, (name, kwargs)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_echo_suffix_and_logprobs_equal_llama_cpp_pythons_loop(pair, stream: bool) -> None:
    ours, stock, facts = pair
    eos = eog_of(ours)[0]
    script = scripts(ours, facts)["split characters"]
    # llama-cpp-python sorts the whole vocabulary for each token's logprobs: a short script for those
    short = script[:4] + character_split(facts, "東🎉")
    # top logprobs name tokens the script did not write: with this prompt none is a long piece, which
    # llama-cpp-python would write as "" (its pieces lose their text: see the test above)
    prompt = "Once upon a time there was"
    for tokens, kwargs in ((script, dict(echo=True)), (script, dict(suffix=" THE END")), (short, dict(logprobs=3)),
                           (short, dict(logprobs=2, echo=True)), (short, dict(logprobs=1, stop=["東"]))):
        if stream and kwargs.get("echo"):
            continue   # llama-cpp-python does not echo a streamed prompt
        expected = complete(stock, tokens, eos, prompt=prompt, max_tokens=len(tokens) + 2, stream=stream, **kwargs)
        assert complete(ours, tokens, eos, prompt=prompt, max_tokens=len(tokens) + 2, stream=stream,
                        **kwargs) == expected, kwargs


def test_a_budgeted_completion_equals_llama_cpp_pythons_loop(tiny_vocab_model: str, pair) -> None:
    """With a budget the cache is compressed many times on the way; the text loop is the same."""
    _, stock, facts = pair
    ours = Llama(tiny_vocab_model, kv_budget=32, kv_buffer=16, **THREADS)
    try:
        eos = eog_of(ours)[0]
        script = scripts(ours, facts)["split characters"] * 4
        prompt = ours.tokenize(b"Once upon a time", add_bos=False)
        for stream in (False, True):
            for stop in ([], ["東京 ✅"]):
                expected = complete(stock, script, eos, prompt=prompt, max_tokens=len(script), stream=stream,
                                    stop=stop)
                assert complete(ours, script, eos, prompt=prompt, max_tokens=len(script), stream=stream,
                                stop=stop) == expected
                if not stop:
                    assert ours.kv_stats().compressions > 0
    finally:
        ours.close()


def test_batched_requests_equal_llama_cpp_pythons_loop(tiny_vocab_model: str, pair) -> None:
    """Each request of a batch detokenizes its own stream (a view's detokenizer is its own)."""
    ours, stock, facts = pair
    eos = eog_of(ours)[0]
    named = scripts(ours, facts)
    prompt = ours.tokenize(b"Once upon a time", add_bos=False)
    requests = [dict(prompt=prompt, max_tokens=len(s) + 3, stream=stream, stop=stop)
                for s, stream, stop in zip(named.values(), (True, False, True, True), ([], ["✅"], ["東"], []))]
    expected = [complete(stock, s, eos, **r) for s, r in zip(named.values(), requests)]
    with BatchedLlama(tiny_vocab_model, n_seq_max=4, kv_budget=32, kv_buffer=16, **THREADS) as batch, \
            ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda s, r: complete(batch, s, eos, **r), named.values(), requests))
    assert results == expected


def test_a_stream_goes_on_after_invalid_utf8(pair) -> None:
    """A character cut short and followed by another one never decodes. llama-cpp-python's stream then
    holds back everything after it until the end, retrying every held-back run at each token (O(n)
    decodes per token); ours sends each token's text as it comes, the invalid bytes dropped, and the
    chunks join to the completion's text, which is llama-cpp-python's."""
    ours, stock, facts = pair
    eos = eog_of(ours)[0]
    words = ours.tokenize(b"The answer is 42, naive cafe done. Next line", add_bos=False)
    cut_short = [facts.by_byte[b"\xe0"], facts.by_byte[b"\xa4"]]   # 2 of a 3-byte character
    lone = facts.by_byte[b"\xa4"]   # a continuation byte after a whole character
    script = words + cut_short + words * 4 + [lone] + words
    prompt = ours.tokenize(b"Once upon a time", add_bos=False)
    for stop in ([], ["Next line The"]):
        kwargs = dict(prompt=prompt, max_tokens=len(script) + 5, stop=stop)
        whole = complete(ours, script, eos, **kwargs)
        assert whole == complete(stock, script, eos, **kwargs)
        assert "\ufffd" not in whole["choices"][0]["text"]

        if not stop:
            text = whole["choices"][0]["text"]
            # the text sent before the end token is sampled: all but the last token or so (ours), only
            # what came before the cut character (llama-cpp-python's)
            assert len(streamed_before_the_end(ours, script, eos, kwargs, text)) >= len(text) - 8
            assert len(streamed_before_the_end(stock, script, eos, kwargs, text)) < len(text) // 4


def streamed_before_the_end(llm: Any, script: List[int], end: int, kwargs: Dict[str, Any], text: str) -> str:
    """Streams the script; returns the text of the chunks that came before ``end`` was sampled, after
    checking that all chunks join to ``text``."""
    sampled = [0]

    def counting(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        sampled[0] += 1
        return scores

    processors = forcing(script, end)
    processors.insert(0, counting)
    if isinstance(llm, llama_cpp.Llama) and not isinstance(llm, Llama):
        llm.reset()
    chunks = [(sampled[0], chunk["choices"][0]["text"])
              for chunk in llm.create_completion(temperature=0.0, logits_processor=processors, stream=True, **kwargs)]
    assert "".join(t for _, t in chunks) == text
    return "".join(t for n, t in chunks if n <= len(script))
