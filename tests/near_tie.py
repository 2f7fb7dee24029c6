"""The near-tie rule: when two greedy runs of one model on different kernel paths may part.

Two paths that compute the same thing in another order (a batch against a lone decode, the fused
kernels against the portable graphs, a device or an RPC server against the host, a restored state
against a fresh one, flash attention on or off, other n_batch / n_ubatch splits) round logits
differently: on a tiny random model by up to 1e-3 between a batch and a lone decode (issue 21), by
up to 9e-3 with flash attention on and off; its two best logits are often closer than that. Where
they nearly tie the greedy token may go either way, and everything after it differs.

The rule: the reference run records, per generated token, the gap between its two best logits; the
other run gives the same tokens, or the first token where they differ comes at a step where the
reference's gap was below ``NEAR_TIE``. What follows a legitimate parting is not compared.

Not covered: a compression whose cut-off tie goes the other way on the other path keeps other
tokens, and the logits then differ by far more (flash attention on and off, 16 tiny prompts of 80
tokens at a budget of 32 + 16: two parted at gaps of 0.05-0.08, just after their kept sets first
differed). Each selection is checked against the reference where compressions are tested.

Runs of the same path (the same computation twice) keep exact equality and do not use this module.
The rule is pure numpy (its own tests need no model); the recorders import llama_cpp when used.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

NEAR_TIE = 0.02   # two logits this close may be ordered differently on another path (seen: up to 2 x 9e-3)


def top2_gap(logits: Any) -> float:
    """The gap between the two best logits; inf where only one is finite (a forced token)."""
    values = np.asarray(logits, dtype=np.float64).ravel()
    if values.size < 2:
        return float("inf")
    second, best = np.partition(values, -2)[-2:]
    if not np.isfinite(second):
        return float("inf")
    return float(best - second)


def first_difference(reference: Sequence[Any], other: Sequence[Any]) -> Optional[int]:
    """The first step where two runs differ (a step only one of them has counts); None if equal."""
    for step, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return step
    if len(reference) != len(other):
        return min(len(reference), len(other))
    return None


def parting(reference: Sequence[Any], gaps: Sequence[float], other: Sequence[Any]) -> Tuple[Optional[int], bool]:
    """(the step where ``other`` parts from ``reference`` or None, whether the rule allows it there).

    ``gaps[i]`` is the reference's top-2 gap when it chose step ``i``; a step without a recorded
    gap allows no parting."""
    step = first_difference(reference, other)
    if step is None:
        return None, True
    return step, step < len(gaps) and gaps[step] < NEAR_TIE


def _gap_at(gaps: Sequence[float], step: int) -> str:
    return f"{gaps[step]:.4g}" if step < len(gaps) else "none recorded"


def assert_same_greedy(reference: Sequence[Any], gaps: Sequence[float], other: Sequence[Any],
                       label: str = "") -> Optional[int]:
    """Assert the rule for two runs given step by step (token ids, or anything compared with ==);
    the step where they legitimately part, or None when they are equal."""
    step, allowed = parting(reference, gaps, other)
    if step is not None:
        assert allowed, (
            f"{label + ': ' if label else ''}the runs part at step {step} (reference "
            f"{list(reference[step:step + 3])}..., other {list(other[step:step + 3])}...), where the reference's two "
            f"best logits were {_gap_at(gaps, step)} apart: no near tie (< {NEAR_TIE})")
    return step


def assert_same_unless_a_near_tie(reference: Any, gaps: Sequence[float], other: Any, label: str = "") -> bool:
    """The rule's variant for outcomes that cannot be split into steps (streamed chunks, a server's
    text, a request that completes twice): equal, or the reference met a near tie somewhere on its
    way (its smallest gap below NEAR_TIE). Looser than ``assert_same_greedy``: only where the other
    run's steps cannot be recorded. True when a near tie excused a difference."""
    if reference == other:
        return False
    smallest = min(gaps, default=float("inf"))
    assert smallest < NEAR_TIE, (f"{label + ': ' if label else ''}{other!r} differs from the reference {reference!r}, "
                                 f"whose closest two best logits were {smallest:.4g} apart: no near tie (< {NEAR_TIE})")
    return True


class GapRecorder:
    """A logits processor that records what each sampled token was chosen from: the context (as a
    digest) and the gap between the two best logits, as the greedy sampler sees them.

    llama-cpp-python applies a request's ``logit_bias`` after the caller's processors, and the repeat
    penalty after both: the recorder applies them to its copy of the logits (``recorded`` takes them
    from the request's settings). A grammar, applied last, needs ``GrammarGapRecorder``. It leaves
    the logits as they are.
    """

    def __init__(self, logit_bias: Optional[Mapping[Any, float]] = None, repeat_penalty: float = 1.0,
                 penalty_last_n: int = 64) -> None:
        bias = dict(logit_bias or {})
        self._bias_ids = np.array([int(t) for t in bias], dtype=np.int64)
        self._bias = np.array(list(bias.values()), dtype=np.float64)
        self._repeat_penalty, self._penalty_last_n = float(repeat_penalty), penalty_last_n
        self._completion_start, self._previous_length = 0, -1
        self.gaps: List[float] = []
        self.contexts: List[Tuple[int, bytes]] = []

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int32)
        new_completion = len(ids) != self._previous_length + 1   # else the next sample of the same one
        if new_completion:
            self._completion_start = len(ids)
        self._previous_length = len(ids)
        self.contexts.append((len(ids), hashlib.blake2b(ids.tobytes(), digest_size=16).digest()))
        self.gaps.append(self._gap(ids, np.array(scores, dtype=np.float64), new_completion))
        return scores

    def _gap(self, ids: np.ndarray, logits: np.ndarray, new_completion: bool) -> float:
        return top2_gap(self._as_sampled(ids, logits))

    def _as_sampled(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """``logits`` (changed in place) as the greedy sampler sees them: after the logit bias and the
        repeat penalty."""
        if len(self._bias_ids):
            logits[self._bias_ids] += self._bias
        if self._repeat_penalty != 1.0:
            # llama.cpp's penalties sampler: the tokens this completion sampled, the last n of them
            sampled = np.unique(ids[self._completion_start:][-self._penalty_last_n:])
            if len(sampled):
                values = logits[sampled]
                logits[sampled] = np.where(values <= 0, values * self._repeat_penalty, values / self._repeat_penalty)
        return logits

    def steps(self, outcome: Any) -> List[Any]:
        """The run step by step for ``assert_same_greedy``: what step i chose shows in the context of
        step i + 1; the last step's token no later call sees, so the completion's outcome stands for it."""
        return [*self.contexts[1:], ("outcome", outcome)]


class GrammarGapRecorder(GapRecorder):
    """A ``GapRecorder`` for a completion under a GBNF grammar, which llama.cpp applies after every
    processor: the gap between the two best logits the grammar allows. Its own copy of llama.cpp's
    grammar sampler, fed the tokens the completion sampled, tells which those are."""

    TOP = 64   # the best logits the grammar is asked about first (asking about all is slow)

    def __init__(self, vocab: Any, grammar: str, root: str = "root", **kwargs: Any) -> None:
        import ctypes

        from rkv_local import llama_cpp

        super().__init__(**kwargs)
        self._llama_cpp, self._ctypes = llama_cpp, ctypes
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), root.encode())
        assert self._sampler, "llama.cpp could not parse the grammar"
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._data = np.recarray((n_vocab,), dtype=np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)],
                                                            align=True))
        self._array = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False)

    def __del__(self) -> None:
        if getattr(self, "_sampler", None):
            self._llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None

    def _allowed(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The grammar's verdict on ``ids``: their logits, -inf where it refuses the token."""
        n = len(ids)
        self._data.id[:n], self._data.logit[:n], self._data.p[:n] = ids, logits[ids], 0.0
        self._array.size, self._array.selected, self._array.sorted = n, -1, False
        self._llama_cpp.llama_sampler_apply(self._sampler, self._ctypes.byref(self._array))
        out = np.full(len(logits), -np.inf)
        kept = self._data[:self._array.size]
        out[kept.id] = kept.logit
        return out

    def _gap(self, ids: np.ndarray, logits: np.ndarray, new_completion: bool) -> float:
        if new_completion:
            self._llama_cpp.llama_sampler_reset(self._sampler)
        else:
            self._llama_cpp.llama_sampler_accept(self._sampler, int(ids[-1]))   # what the last step chose
        logits = self._as_sampled(ids, logits)
        best = np.argpartition(-logits, self.TOP)[:self.TOP]
        allowed = self._allowed(best.astype(np.intc), logits)
        if np.isfinite(allowed).sum() < 2:   # fewer than two among the best: ask about every token
            allowed = self._allowed(np.arange(len(logits), dtype=np.intc), logits)
        return top2_gap(allowed)


def recorded(settings: Dict[str, Any]) -> Tuple[GapRecorder, Dict[str, Any]]:
    """A ``GapRecorder`` for a completion with these settings (their logit_bias and repeat_penalty;
    llama-cpp-python's default penalty is 1.0), and the settings with it after their logits processors."""
    from rkv_local import llama_cpp   # here: the rule's own tests need no library

    assert settings.get("grammar") is None, "a grammar's completion needs a GrammarGapRecorder"
    recorder = GapRecorder(settings.get("logit_bias"), settings.get("repeat_penalty", 1.0))
    processors = llama_cpp.LogitsProcessorList([*(settings.get("logits_processor") or []), recorder])
    return recorder, dict(settings, logits_processor=processors)


def assert_same_completion(reference: GapRecorder, reference_outcome: Any, other: GapRecorder, other_outcome: Any,
                           label: str = "") -> Optional[int]:
    """The rule for two completions, each recorded by a ``GapRecorder`` (e.g. a text, or a list of
    chunks): the step where they legitimately part, or None when they are equal."""
    step, allowed = parting(reference.steps(reference_outcome), reference.gaps, other.steps(other_outcome))
    if step is not None:
        assert allowed, (
            f"{label + ': ' if label else ''}{other_outcome!r} parts from the reference {reference_outcome!r} at step "
            f"{step}, where the reference's two best logits were {_gap_at(reference.gaps, step)} apart: "
            f"no near tie (< {NEAR_TIE})")
    return step


__all__ = [
    "NEAR_TIE", "GapRecorder", "GrammarGapRecorder", "assert_same_completion", "assert_same_greedy",
    "assert_same_unless_a_near_tie", "first_difference", "parting", "recorded", "top2_gap",
]
