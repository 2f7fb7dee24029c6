"""A reasoning chat with a budget: the prompt kept whole between turns, thinking-only compression,
the thinking apart from the answer (Llama, BatchedLlama, the server through the openai client).

A tiny random model writes reasoning-shaped text under a grammar (thinking, ``</think>``, a short
answer), with a chat template that opens the thinking in the prompt and drops it from the history,
as DeepSeek-R1's does."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

from rkv_local import BatchedLlama, Llama, llama_cpp
from rkv_local.reasoning import ReasoningSplitter, split_message

from near_tie import GrammarGapRecorder, assert_same_completion, assert_same_unless_a_near_tie

THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and '</think>' in m['content'] %}{{ m['content'].split('</think>')[-1] | trim }}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
THINKING_CHARS, ANSWER_CHARS = 600, 80
GRAMMAR = f'root ::= [a-z ]{{{THINKING_CHARS}}} "</think>" "\\n\\n" [a-z]{{{ANSWER_CHARS}}}'
BUDGET, BUFFER, WINDOW, KEEP = 40, 16, 8, 128
TURN1 = [{"role": "system", "content": "You think before you answer."},
         {"role": "user", "content": "What is the sum of the first ten odd numbers?"}]


@pytest.fixture(scope="module")
def thinker(tiny_model) -> Path:
    return tiny_model(arch="qwen2", n_head=4, n_head_kv=2, chat_template=THINK_TEMPLATE)


def make(path: Path, **kw: Any) -> Llama:
    kw.setdefault("kv_keep_prompt", KEEP)
    return Llama(str(path), kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW, n_threads=2, verbose=False,
                 flash_attn=True, **kw)


def ask(llm: Any, messages: List[Dict[str, str]], recorder: Optional[GrammarGapRecorder] = None, **kw: Any) -> Any:
    if recorder is not None:
        kw["logits_processor"] = llama_cpp.LogitsProcessorList([recorder])
    return llm.create_chat_completion(messages, grammar=_grammar(), max_tokens=1200, temperature=0.0,
                                      reasoning_format="deepseek", **kw)


def gap_recorder(llm: Any) -> GrammarGapRecorder:
    """What ``ask``'s greedy choices were made from (the grammar's tokens): runs on two paths may part
    at a near tie (tests/near_tie.py)."""
    model = llm._proto._model if isinstance(llm, BatchedLlama) else llm._model
    return GrammarGapRecorder(model.vocab, GRAMMAR)


def _grammar():
    from llama_cpp import LlamaGrammar
    return LlamaGrammar.from_string(GRAMMAR, verbose=False)


def turn2(answer: Dict[str, Any]) -> List[Dict[str, str]]:
    return TURN1 + [{"role": "assistant", "content": answer["content"]},
                    {"role": "user", "content": "And of the first twenty?"}]


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_the_splitter_streams_what_it_gives_whole() -> None:
    text = "  <think>\nfirst, sum them</think>\n\nit is 100"
    whole = split_message({"choices": [{"message": {"content": text}}]}, thinking=False)["choices"][0]["message"]
    assert (whole["reasoning_content"], whole["content"]) == ("\nfirst, sum them", "it is 100")
    for size in (1, 2, 3, 7):
        s = ReasoningSplitter()
        for i in range(0, len(text), size):
            s.feed(text[i:i + size])
        s.finish()
        assert ("".join(s.reasoning), "".join(s.content)) == ("\nfirst, sum them", "it is 100"), size
    # the thinking opened by the prompt; no thinking at all; a </think> split over chunks
    s = ReasoningSplitter(thinking=True)
    assert [s.feed(t) for t in ("so 1+3", "</thi", "nk>\n\n4")] == [("so 1+3", ""), ("", ""), ("", "4")]
    s = ReasoningSplitter()
    assert s.feed("<thin") == ("", "") and s.feed("g>") == ("", "<thing>") and s.finish() == ("", "")


def test_turn_two_evaluates_only_its_new_tokens_and_answers_as_a_fresh_instance(thinker: Path) -> None:
    llm = make(thinker, kv_compress="think")
    first = ask(llm, TURN1)["choices"][0]
    message = first["message"]
    assert first["finish_reason"] == "stop"
    assert len(message["reasoning_content"]) == THINKING_CHARS and len(message["content"]) == ANSWER_CHARS
    s1 = llm.kv_stats()
    assert s1.compressions >= 2 and s1.compression_paused and s1.cells_kept == s1.prompt_tokens
    turn1_tokens = list(llm._input_ids[:llm.n_tokens])

    # thinking-only compression: the last compression came right before the token that completed
    # </think>, and every layer and head holds every token from there on
    p_marker = next(p for p in range(s1.prompt_tokens, llm.n_tokens)
                    if b"</think>" in llm.detokenize(turn1_tokens[s1.prompt_tokens:p + 1], special=True))
    assert s1.pos_compacted == p_marker - 1 - WINDOW
    answer = set(range(p_marker, llm.n_tokens))
    assert len(answer) > 10
    for layer in range(2):
        for head in range(2):
            assert answer <= set(llm.kept_positions(layer, head).tolist()), (layer, head)

    second_recorder = gap_recorder(llm)
    second = ask(llm, turn2(message), second_recorder)["choices"][0]["message"]
    s2 = llm.kv_stats()
    reused = common_prefix(turn1_tokens, list(llm._input_ids[:s2.prompt_tokens]))
    # the kept prompt, but for the opened thinking (and the tokens its newline merges with)
    assert reused >= s1.prompt_tokens - 6
    assert s2.prompt_tokens_evaluated == s2.prompt_tokens - reused
    assert s2.cells_kept == s2.prompt_tokens

    fresh = make(thinker, kv_compress="think")
    again_recorder = gap_recorder(fresh)
    again = ask(fresh, turn2(message), again_recorder)["choices"][0]["message"]
    assert fresh.kv_stats().prompt_tokens_evaluated == s2.prompt_tokens
    # the fresh instance evaluates the prompt in other batches: a near tie may go the other way
    assert_same_completion(again_recorder, (again["reasoning_content"], again["content"]),
                           second_recorder, (second["reasoning_content"], second["content"]))


def test_without_a_kept_prompt_turn_two_evaluates_everything(thinker: Path) -> None:
    """Today's behaviour, which the kept prompt replaces: the prompt was compressed with the thinking."""
    llm = make(thinker, kv_keep_prompt=0)
    message = ask(llm, TURN1)["choices"][0]["message"]
    assert llm.kv_stats().compressions >= 2
    ask(llm, turn2(message))
    s = llm.kv_stats()
    assert s.prompt_tokens_evaluated == s.prompt_tokens


def test_batched_requests_stream_the_thinking_apart(thinker: Path) -> None:
    alone = make(thinker, kv_compress="think")
    lone = gap_recorder(alone)
    expected = ask(alone, TURN1, lone)["choices"][0]["message"]
    batched = BatchedLlama(str(thinker), n_seq_max=2, kv_budget=BUDGET, kv_buffer=BUFFER, kv_window=WINDOW,
                           kv_keep_prompt=KEEP, kv_compress="think", n_threads=2, verbose=False)
    try:
        reasoning, content = [], []
        streamed = gap_recorder(batched)
        for chunk in ask(batched, TURN1, streamed, stream=True):
            delta = chunk["choices"][0]["delta"]
            reasoning.append(delta.get("reasoning_content") or "")
            content.append(delta.get("content") or "")
        # a BatchedLlama's decodes round otherwise than a Llama's: a near tie may go the other way
        assert_same_completion(lone, (expected["reasoning_content"], expected["content"]),
                               streamed, ("".join(reasoning), "".join(content)))
        plain_recorder = gap_recorder(batched)
        plain = batched.create_chat_completion(TURN1, grammar=_grammar(), max_tokens=1200, temperature=0.0,
                                               logits_processor=llama_cpp.LogitsProcessorList([plain_recorder]))
        text = plain["choices"][0]["message"]["content"]
        assert_same_completion(lone, expected["reasoning_content"] + "</think>\n\n" + expected["content"],
                               plain_recorder, text)
    finally:
        batched.close()


def test_a_template_without_thinking_needs_a_marker(tiny_model) -> None:
    plain = tiny_model(arch="llama", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="kv_think_end"):
        make(plain, kv_compress="think")
    with pytest.raises(ValueError, match="kv_compress"):
        make(plain, kv_compress="answer")
    with pytest.raises(ValueError, match="reasoning_format"):
        make(plain).create_chat_completion([{"role": "user", "content": "hi"}], reasoning_format="qwen")


def test_the_server_gives_reasoning_content_to_the_openai_client(thinker: Path, tmp_path: Path) -> None:
    from test_server import serve

    alone = make(thinker, kv_compress="think")
    lone = gap_recorder(alone)
    expected = ask(alone, TURN1, lone)["choices"][0]["message"]
    thought = (expected["reasoning_content"], expected["content"])
    options = ("--kv-budget", str(BUDGET), "--kv-buffer", str(BUFFER), "--kv-keep-prompt", str(KEEP),
               "--kv-compress", "think", "--reasoning-format", "deepseek", "--n-threads", "2")
    with serve(thinker, tmp_path, *options) as server:
        client = server.client()
        # llama-cpp-python's server requests default to repeat_penalty 1.1; Llama's to 1.0
        extra = {"grammar": GRAMMAR, "repeat_penalty": 1.0}
        body = dict(model="m", messages=TURN1, max_tokens=1200, temperature=0.0, extra_body=extra)
        # the server's BatchedLlama rounds otherwise than a Llama, and its steps cannot be recorded here: a
        # difference needs a near tie on the lone run's way (tests/near_tie.py, its loose variant)
        message = client.chat.completions.create(**body).choices[0].message
        assert_same_unless_a_near_tie(thought, lone.gaps, (message.reasoning_content, message.content))
        reasoning, content = [], []
        for chunk in client.chat.completions.create(stream=True, **body):
            if chunk.choices:
                delta = chunk.choices[0].delta
                reasoning.append(getattr(delta, "reasoning_content", None) or "")
                content.append(delta.content or "")
        assert ("".join(reasoning), "".join(content)) == (message.reasoning_content, message.content)
        # a request may ask for the text as the model wrote it
        plain = client.chat.completions.create(extra_body={**extra, "reasoning_format": "none"},
                                               **{k: v for k, v in body.items() if k != "extra_body"})
        assert plain.choices[0].message.content == message.reasoning_content + "</think>\n\n" + message.content
