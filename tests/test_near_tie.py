"""The near-tie rule itself (tests/near_tie.py), on made-up runs: no model needed."""
from __future__ import annotations

import numpy as np
import pytest

from near_tie import (
    NEAR_TIE, GapRecorder, assert_same_completion, assert_same_greedy, assert_same_unless_a_near_tie,
    first_difference, top2_gap,
)

WIDE, TIE = 0.5, NEAR_TIE / 10


def test_top2_gap_of_logits_and_of_a_forced_token() -> None:
    assert top2_gap(np.array([0.1, 2.0, 1.5, -3.0], dtype=np.float32)) == pytest.approx(0.5)
    assert top2_gap([1.0, 1.0, 0.0]) == 0.0
    assert top2_gap([-np.inf, 0.0, -np.inf]) == np.inf   # one finite logit: nothing to tie with
    assert top2_gap([3.0]) == np.inf


def test_first_difference_counts_a_missing_step() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], []) is None


def test_equal_runs_pass_whatever_their_gaps() -> None:
    assert assert_same_greedy([5, 6, 7], [WIDE, WIDE, WIDE], [5, 6, 7]) is None
    assert assert_same_greedy([5, 6, 7], [TIE, TIE, TIE], [5, 6, 7]) is None
    assert assert_same_greedy([], [], []) is None


def test_a_parting_at_a_near_tie_passes_and_what_follows_is_not_compared() -> None:
    assert assert_same_greedy([5, 6, 7, 8], [WIDE, TIE, WIDE, WIDE], [5, 9, 1, 2]) == 1
    # just below the threshold, and the runs of different lengths after it
    assert assert_same_greedy([5, 6, 7], [WIDE, NEAR_TIE * 0.99, WIDE], [5, 9]) == 1


def test_a_parting_at_a_wide_gap_fails() -> None:
    with pytest.raises(AssertionError, match="part at step 2.*0.5 apart: no near tie"):
        assert_same_greedy([5, 6, 7, 8], [TIE, TIE, WIDE, TIE], [5, 6, 9, 8], "case")
    with pytest.raises(AssertionError, match="no near tie"):   # the threshold itself is no near tie
        assert_same_greedy([5, 6], [WIDE, NEAR_TIE], [5, 7])
    # a near tie earlier, where the runs agreed, excuses nothing later
    with pytest.raises(AssertionError):
        assert_same_greedy([5, 6, 7], [TIE, WIDE, WIDE], [5, 6, 9])


def test_a_parting_where_the_reference_recorded_no_gap_fails() -> None:
    with pytest.raises(AssertionError, match="none recorded"):
        assert_same_greedy([5, 6, 7], [TIE, TIE], [5, 6, 9])
    with pytest.raises(AssertionError, match="none recorded"):
        assert_same_greedy([5, 6], [TIE, TIE], [5, 6, 7])   # the other run went on: a step with no gap


def test_runs_of_different_lengths_fail_without_a_near_tie_where_the_shorter_ends() -> None:
    with pytest.raises(AssertionError, match="part at step 2"):
        assert_same_greedy([5, 6, 7], [TIE, TIE, WIDE], [5, 6])
    assert assert_same_greedy([5, 6, 7], [WIDE, WIDE, TIE], [5, 6]) == 2


def test_the_loose_variant_needs_a_near_tie_anywhere_in_the_reference() -> None:
    assert assert_same_unless_a_near_tie(["a", "b"], [WIDE], ["a", "b"]) is False
    assert assert_same_unless_a_near_tie(["a", "b"], [WIDE, TIE, WIDE], ["a", "c"]) is True
    with pytest.raises(AssertionError, match="no near tie"):
        assert_same_unless_a_near_tie(["a", "b"], [WIDE, WIDE], ["a", "c"], "request 3")
    with pytest.raises(AssertionError, match="no near tie"):
        assert_same_unless_a_near_tie("ab", [], "ac")


def run(recorder: GapRecorder, prompt: list[int], chosen: list[int], logits: list[np.ndarray]) -> list[int]:
    """Feed a recorder as llama-cpp-python's sampler would: the context, then the step's logits."""
    context = list(prompt)
    for token, step_logits in zip(chosen, logits):
        recorder(np.array(context, dtype=np.intc), step_logits.astype(np.float32))
        context.append(token)
    return context


def logits_with(best: int, gap: float, n_vocab: int = 32) -> np.ndarray:
    values = np.zeros(n_vocab)
    values[best] = 1.0
    values[(best + 1) % n_vocab] = 1.0 - gap
    return values


def test_the_recorder_records_each_step_and_leaves_the_logits_alone() -> None:
    recorder = GapRecorder()
    scores = logits_with(3, 0.25).astype(np.float32)
    assert recorder(np.array([1, 2], dtype=np.intc), scores) is scores
    assert recorder.gaps == [pytest.approx(0.25)] and len(recorder.contexts) == 1
    assert scores[3] == 1.0


def test_the_recorder_sees_the_logit_bias_and_the_repeat_penalty() -> None:
    scores = np.array([4.0, 3.0, 2.9, -1.0], dtype=np.float32)
    biased = GapRecorder(logit_bias={0: -np.inf})   # applied after the caller's processors
    biased(np.array([1], dtype=np.intc), scores)
    assert biased.gaps == [pytest.approx(0.1)]
    # the penalty: on the tokens this completion sampled (0, after the prompt), not on the prompt's (1, 2)
    penalised = GapRecorder(repeat_penalty=2.0)
    penalised(np.array([7, 1, 2], dtype=np.intc), scores)      # the first step: nothing sampled yet
    penalised(np.array([7, 1, 2, 0], dtype=np.intc), scores)
    assert penalised.gaps == [pytest.approx(1.0), pytest.approx(0.1)]   # 4.0 / 2 falls below 3.0 and 2.9


def test_completions_that_part_at_a_near_tie_pass() -> None:
    prompt = [1, 2, 3]
    gaps = [WIDE, WIDE, TIE, WIDE]
    reference, other = GapRecorder(), GapRecorder()
    run(reference, prompt, [10, 11, 12, 13], [logits_with(t, g) for t, g in zip([10, 11, 12, 13], gaps)])
    run(other, prompt, [10, 11, 14, 15], [logits_with(t, g) for t, g in zip([10, 11, 14, 15], gaps)])
    assert assert_same_completion(reference, "abcd", other, "abxy") == 2
    # the same steps and the same text: equal
    again = GapRecorder()
    run(again, prompt, [10, 11, 12, 13], [logits_with(t, g) for t, g in zip([10, 11, 12, 13], gaps)])
    assert assert_same_completion(reference, "abcd", again, "abcd") is None


def test_completions_that_part_at_a_wide_gap_fail() -> None:
    prompt = [1, 2, 3]
    reference, other = GapRecorder(), GapRecorder()
    run(reference, prompt, [10, 11, 12], [logits_with(t, g) for t, g in zip([10, 11, 12], [TIE, WIDE, TIE])])
    run(other, prompt, [10, 14, 12], [logits_with(t, g) for t, g in zip([10, 14, 12], [TIE, WIDE, TIE])])
    with pytest.raises(AssertionError, match="at step 1, .*0.5 apart"):
        assert_same_completion(reference, "abc", other, "axc")


def test_completions_whose_last_token_differs_are_judged_by_the_last_gap() -> None:
    """No later call sees the last token: the outcome stands for it."""
    prompt = [1, 2, 3]
    for last_gap, allowed in ((TIE, True), (WIDE, False)):
        reference, other = GapRecorder(), GapRecorder()
        for recorder in (reference, other):
            run(recorder, prompt, [10, 11], [logits_with(10, WIDE), logits_with(11, last_gap)])
        if allowed:
            assert assert_same_completion(reference, "ab", other, "ax") == 1
        else:
            with pytest.raises(AssertionError, match="at step 1"):
                assert_same_completion(reference, "ab", other, "ax")


def test_a_completion_that_stops_early_parts_where_it_stopped() -> None:
    prompt = [1, 2, 3]
    reference, other = GapRecorder(), GapRecorder()
    run(reference, prompt, [10, 11, 12], [logits_with(t, g) for t, g in zip([10, 11, 12], [WIDE, TIE, WIDE])])
    run(other, prompt, [10, 2], [logits_with(10, WIDE), logits_with(2, TIE)])   # an end token at step 1
    assert assert_same_completion(reference, "abc", other, "a") == 1
    short = GapRecorder()
    run(short, prompt, [10], [logits_with(10, WIDE)])                            # an end token at step 0
    with pytest.raises(AssertionError, match="at step 0"):
        assert_same_completion(reference, "abc", short, "")


def test_the_grammar_recorder_takes_the_gap_among_the_tokens_the_grammar_allows(tiny_model) -> None:
    from rkv_local import Llama
    from near_tie import GrammarGapRecorder

    llm = Llama(str(tiny_model(arch="llama")), n_ctx=64, verbose=False)
    try:
        (bang,), (a,), (one,), (two,) = (llm.tokenize(text, add_bos=False) for text in (b"!", b"a", b"1", b"2"))
        plain, grammar = GapRecorder(), GrammarGapRecorder(llm._model.vocab, 'root ::= "a" [0-9]')
        scores = np.full(llm.n_vocab(), -5.0, dtype=np.float32)
        scores[[bang, a, one]] = 10.0, 3.0, 2.5
        for recorder in (plain, grammar):
            recorder(np.array([1, 2], dtype=np.intc), scores)
        assert plain.gaps == [pytest.approx(7.0)] and grammar.gaps == [np.inf]   # only "a" allowed: no tie
        # the next step: the grammar, fed "a", allows digits; more than 64 better tokens it refuses
        refused = [t for t in range(1000, 1200)
                   if not any(c.isdigit() for c in llm.detokenize([t]).decode(errors="replace"))]
        scores[refused[:80]] = 9.0
        scores[[a, one, two]] = 2.9, 3.0, 2.5
        grammar(np.array([1, 2, a], dtype=np.intc), scores)
        assert grammar.gaps[1] == pytest.approx(0.5)
    finally:
        llm.close()
