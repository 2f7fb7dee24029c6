"""Random-operation fuzz: interleavings of what users do to a compressed cache, with the invariants
checked after every step (issue 14, item 1).

A fixed seed per case makes every failure reproducible: the failing step prints its seed, case and
the operations that led to it. `make test` runs about 1,700 steps in all; a long run:

    .venv/bin/python -m pytest -q tests/test_fuzz.py --fuzz-steps 10000

(`--fuzz-steps` is the number of steps of each case; `--fuzz-seed` changes the seeds.)

Two drivers:

- `LlamaFuzz`, one sequence through the public `Llama`: decodes of 1..b tokens, prompts longer than
  the cache, completions that reuse a prefix or depart from it, truncations at random positions
  (inside the compressed part too, where they must be refused and leave the cache as it was),
  forced compressions, state saved and loaded (bytes and pickled files, into the same instance or
  a new one), `reset()`, and new instances with another method or budget.
- `StreamsFuzz`, several sequences of one context through llama.cpp's API, as a server drives them:
  decode calls that mix sequences, `seq_rm` (tail and whole), `seq_cp` of a whole sequence into an
  empty one, forced compressions, and per-sequence state save/load.

Invariants after every step: cells in use ≤ B + b per sequence (plus the kept prompt, which every
head holds whole); what a head holds after decoding or compressing is what it held or a new token;
the newest `window` tokens are always held; every third compression selects as `reference.select`
(observed as it runs, automatic ones included); a truncation is refused exactly where the last
compression saw the positions (or the window layers dropped what the next token needs); kept positions strictly increasing,
ending at the newest token, as many per head as cells in use; the engine's token count, the
cache's newest position and the Python side's `n_tokens` agree; `kv_stats()` bytes match its cell
counts; a state saved and loaded gives bit-identical next logits, and the greedy continuation after
loading equals the one without the save (for sliding-window models: logits within 2e-2, as llama.cpp
restores their cache's cells elsewhere, with or without a budget, and the same tokens but after a near
tie of tests/near_tie.py); the window layers hold at least
the window of the next token.
"""
from __future__ import annotations

import ctypes
import pickle
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from rkv_local import Llama, _native, calibration, reference
import llama_cpp

from engine_helpers import GGML_TYPES, SpecWatch, decode, last_logits, low_level_context, shape_of
from near_tie import assert_same_greedy, top2_gap

B, b = 32, 16
WINDOW = 8       # kv_window's default
SPEC_EVERY = 3   # every third compression of a sequence is compared with the spec
N_CTX = 700  # logical context: small, so that runs reach it and must be refused there
METHODS = reference.METHODS


@dataclass(frozen=True)
class Case:
    """One model shape and K/V layout."""

    name: str
    model: dict = field(default_factory=dict)        # make_tiny_model arguments (empty: SmolLM2)
    type_kv: str = "f16"
    flash_attn: bool = False
    steps: int = 170                                   # steps of `make test`
    keep: int = 0                                      # kv_keep_prompt: completions' prompts kept whole

    def llama_kwargs(self) -> dict:
        # a quantized V cache needs flash attention in llama.cpp
        return dict(type_k=GGML_TYPES[self.type_kv],
                    type_v=GGML_TYPES[self.type_kv] if self.flash_attn else GGML_TYPES["f16"],
                    flash_attn=self.flash_attn)


CASES = [
    Case("llama-gqa-f16", dict(arch="llama", n_head=4, n_head_kv=2, head_dim=32)),
    Case("qwen2-mqa-q8_0", dict(arch="qwen2", n_head=4, n_head_kv=1, head_dim=64), type_kv="q8_0"),
    Case("llama-mha-q4_0-fa", dict(arch="llama", n_head=2, n_head_kv=2, head_dim=64), type_kv="q4_0",
         flash_attn=True),
    Case("qwen3-gqa4-q8_0-fa", dict(arch="qwen3", n_layer=3, n_head=8, n_head_kv=2, head_dim=32),
         type_kv="q8_0", flash_attn=True),
    Case("llama-gqa-f16-kept-prompt", dict(arch="llama", n_head=4, n_head_kv=2, head_dim=32), keep=40),
    Case("smollm2", {}, steps=120),
    # interleaved sliding windows of N_SWA tokens: sinks (gpt-oss), five window layers to one (gemma3)
    Case("gpt-oss-sinks-iswa", dict(arch="gpt-oss", n_layer=4, n_head=4, n_head_kv=2, head_dim=32, sliding_window=32)),
    Case("gemma3-iswa-q8_0-fa", dict(arch="gemma3", n_layer=6, n_head=4, n_head_kv=2, head_dim=32, sliding_window=32),
         type_kv="q8_0", flash_attn=True),
]


class FuzzFailure(AssertionError):
    pass


class OperationChooser:
    """Random operations by weight, every TOUR_EVERY-th step the next one of a shuffled tour of them
    all, so that a short run still runs the rare ones."""

    TOUR_EVERY = 8

    def __init__(self, rng: np.random.Generator, names: list[str], weights: np.ndarray) -> None:
        self.rng, self.names, self.p = rng, names, weights / weights.sum()
        self.steps = 0
        self.tour: list[str] = []

    def __call__(self) -> str:
        self.steps += 1
        if self.steps % self.TOUR_EVERY:
            return str(self.rng.choice(self.names, p=self.p))
        if not self.tour:
            self.tour = [str(n) for n in self.rng.permutation(self.names)]
        return self.tour.pop()


def random_tokens(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(100, 20000, size=n)]


# ---------------------------------------------------------------------------
# one sequence through Llama
# ---------------------------------------------------------------------------

class LlamaFuzz:
    """A budgeted Llama driven by random operations; `tokens` is what its sequence holds."""

    def __init__(self, path: Path, case: Case, rng: np.random.Generator, tmp: Path) -> None:
        self.path, self.case, self.rng, self.tmp = path, case, rng, tmp
        self.llm: Optional[Llama] = None
        self.watches: list[SpecWatch] = []
        self.scored_to_end = False  # the last compression came after the newest token (compress_now)
        self.budget = B
        self.method = "rkv"
        self.open(self.method, self.budget)
        self.ops: dict[str, Callable[[], None]] = {
            "decode": self.op_decode, "greedy": self.op_greedy, "long_prompt": self.op_long_prompt,
            "completion": self.op_completion, "truncate": self.op_truncate, "compress": self.op_compress,
            "save_load": self.op_save_load, "save_load_file": self.op_save_load_file, "reset": self.op_reset,
            "reopen": self.op_reopen,
        }
        self.choose = OperationChooser(rng, list(self.ops), np.array([30, 12, 4, 6, 8, 5, 6, 2, 2, 1], dtype=float))

    def open(self, method: str, budget: int) -> None:
        if self.llm is not None:
            self.llm.close()
        self.method, self.budget = method, budget
        self.llm = self.new_llama()
        self.per_cell = _native.bytes_per_cell(self.llm._ctx.ctx)
        n_model = self.llm._model
        self.heads = [(layer, head) for layer in self.llm.compressed_layers()
                      for head in range(llama_cpp.llama_model_n_head_kv(n_model.model))]
        self.n_swa = self.case.model.get("sliding_window", 0)  # 0: no window layers

    def calibration(self) -> dict:
        """triattention's calibration file of the fuzzed model (made once, on a short text)."""
        if self.method != "triattention":
            return {}
        path = self.tmp / "triattention.npz"
        if not path.exists():
            text = " ".join(f"item {i} costs {3 * i + 2} coins" for i in range(200))
            calibration.calibrate(self.path, text=text, n_tokens=128, progress=False, n_threads=1).save(path)
        return {"kv_calibration": str(path)}

    def new_llama(self) -> Llama:
        llm = Llama(str(self.path), kv_budget=self.budget, kv_buffer=b, kv_method=self.method, n_ctx=N_CTX,
                    kv_keep_prompt=self.case.keep, n_threads=1, n_threads_batch=1, verbose=False,
                    **self.case.llama_kwargs(), **self.calibration())
        if self.case.model.get("arch") != "gpt-oss":   # the spec's sinks are not read back from the model
            # every SPEC_EVERY-th automatic or forced compression against the spec, as it runs
            self.watches.append(SpecWatch(
                llm._ctx.ctx, self.method, shape_of(llm._model.model),
                reference.ScoringParams(budget=self.budget, window=WINDOW), layers=llm.compressed_layers(),
                every=SPEC_EVERY, calibration=llm._kv_calibration))
        return llm

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()

    @property
    def tokens(self) -> list[int]:
        return self.llm.input_ids[: self.llm.n_tokens].tolist()

    def step(self) -> tuple[str, bool]:
        name = self.choose()
        n_before = self.llm.n_tokens
        kept_before = self.kept_sets()
        ran = self.ops[name]() is not False
        if name != "compress" and (self.llm.n_tokens != n_before or name in ("reset", "reopen", "long_prompt")):
            self.scored_to_end = False
        self.check()
        if name in ("decode", "greedy", "compress"):
            # what a head holds after adding tokens or compressing: what it held, or a new token
            new = set(range(n_before, self.llm.n_tokens))
            for (layer, head), before, after in zip(self.heads, kept_before, self.kept_sets()):
                assert after <= before | new, (name, layer, head, sorted(after - before - new)[:5])
        for watch in self.watches:
            assert not watch.failures, watch.failures[:3]
        return name, ran

    def kept_sets(self) -> list[set[int]]:
        return [set(self.llm.kept_positions(layer, head).tolist()) for layer, head in self.heads]

    # -- operations ------------------------------------------------------

    def eval_checked(self, tokens: list[int]) -> bool:
        """Evaluate, or check the refusal at the logical context left everything as it was."""
        llm = self.llm
        before = (llm.n_tokens, llm.kv_stats().cells_used)
        if llm.n_tokens + len(tokens) > N_CTX:
            with pytest.raises(ValueError, match="would exceed the logical context"):
                llm.eval(tokens)
            assert (llm.n_tokens, llm.kv_stats().cells_used) == before
            return False
        llm.eval(tokens)
        assert llm.n_tokens == before[0] + len(tokens)
        return True

    def op_decode(self) -> None:
        self.eval_checked(random_tokens(self.rng, int(self.rng.integers(1, b + 1))))

    def greedy(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            tok = int(np.argmax(last_logits(self.llm)))
            if not self.eval_checked([tok]):
                break
            out.append(tok)
        return out

    def op_greedy(self) -> Optional[bool]:
        if not self.llm.n_tokens:
            return False   # nothing to continue from
        self.greedy(int(self.rng.integers(1, 24)))
        return None

    def op_long_prompt(self) -> None:
        self.llm.reset()
        n = int(self.rng.integers(self.budget + b + 1, 4 * (self.budget + b)))
        self.eval_checked(random_tokens(self.rng, n))
        assert self.llm.kv_stats().compressions > 0

    def op_completion(self) -> Optional[bool]:
        """A completion whose prompt keeps a random prefix of what the cache holds."""
        held = self.tokens
        keep = int(self.rng.integers(0, len(held) + 1))
        prompt = held[:keep] + random_tokens(self.rng, int(self.rng.integers(1, 3 * b)))
        max_tokens = int(self.rng.integers(1, 20))
        # llama-cpp-python goes past max_tokens while the text ends inside a UTF-8 character (random
        # models emit byte tokens): leave room for that
        if len(prompt) + 4 * max_tokens >= N_CTX:
            return False   # nothing to do: not counted as a step that ran
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        n_out = out["usage"]["completion_tokens"]
        assert out["usage"]["prompt_tokens"] == len(prompt)
        finish = out["choices"][0]["finish_reason"]
        assert (finish == "length" and n_out >= max_tokens) or (finish == "stop" and n_out <= max_tokens), (finish, n_out)
        assert self.tokens[: len(prompt)] == prompt
        # the last sampled token is returned, not evaluated (llama-cpp-python's rule)
        assert len(prompt) <= self.llm.n_tokens <= len(prompt) + n_out

    def op_truncate(self) -> None:
        llm = self.llm
        n = llm.n_tokens
        p = int(self.rng.integers(0, n + 1))
        before = llm.kv_stats()
        kept_before = [llm.kept_positions(layer, head) for layer, head in self.heads]
        scored = before.pos_compacted + WINDOW   # the newest position the last compression saw
        if llm._ctx.kv_cache_seq_rm(-1, p, -1):
            # allowed: nothing compressed, above what the last compression saw, or back into the kept prompt
            assert before.compressions == 0 or p > scored or p <= before.cells_kept or p == 0, (p, scored)
            llm.n_tokens = p
            if p == 0:
                assert llm.kv_stats().cells_used == 0
            if before.compressions and p <= before.cells_kept:   # into the kept prompt: uncompressed
                after = llm.kv_stats()
                assert (after.cells_used, after.pos_compacted) == (p, -1)
        else:
            # refused only where a compression scored the positions, or where the window layers no
            # longer hold what the next token would attend to: the cache is untouched
            window_dropped = self.n_swa and _native.seq_stats(llm._ctx.ctx).cells_window < n
            assert (before.compressions > 0 or window_dropped) and p < n
            assert window_dropped or p > before.cells_kept   # a kept prompt may always be returned to
            assert window_dropped or p <= scored, (p, scored)   # refused only where the compression saw
            after = llm.kv_stats()
            assert (after.n_tokens, after.cells_used) == (before.n_tokens, before.cells_used)
            for (layer, head), kept in zip(self.heads, kept_before):
                np.testing.assert_array_equal(llm.kept_positions(layer, head), kept)
            # and a prompt departing there is evaluated from scratch instead
            if p > 0 and p + 8 < N_CTX:
                tail = random_tokens(self.rng, 8)
                out = llm.create_completion(self.tokens[:p] + tail, max_tokens=1, temperature=0.0)
                assert out["usage"]["prompt_tokens"] == p + 8
                assert llm.kv_stats().prompt_tokens_evaluated == p + 8

    def op_compress(self) -> None:
        before = self.llm.kv_stats()
        done = self.llm.compress_now()
        after = self.llm.kv_stats()
        if before.cells_used > before.cells_kept + self.budget:
            assert done and after.cells_used == before.cells_kept + self.budget
            assert after.compressions == before.compressions + 1
            self.scored_to_end = True
        else:
            assert not done and after.cells_used == before.cells_used

    def generate(self, n: int) -> tuple[list[int], np.ndarray, list[float]]:
        """n greedy tokens after what the cache holds, by llama-cpp-python's generate (which
        re-evaluates the last token of a restored state), the logits of the first, and the gap
        between the two best logits of each (for near_tie.assert_same_greedy)."""
        first: list[np.ndarray] = []
        gaps: list[float] = []

        def capture(_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
            if not first:
                first.append(scores.copy())
            gaps.append(top2_gap(scores))
            return scores

        out = []
        for tok in self.llm.generate(self.tokens, top_k=1, temp=0.0,
                                     logits_processor=llama_cpp.LogitsProcessorList([capture])):
            out.append(int(tok))
            if len(out) == n:
                break
        return out, first[0], gaps[:n]

    def continuation_check(self, save: Callable[[], Callable[[], None]]) -> Optional[bool]:
        """Save, go on greedily, do something else, restore, and go on again: the same tokens from
        bit-identical logits."""
        llm = self.llm
        if llm.n_tokens == 0 or llm.n_tokens + 16 > N_CTX:
            return False   # nothing to do: not counted as a step that ran
        # After a restore the last token is evaluated again, alone: its logits are bit-identical when
        # it was evaluated alone before too (a batch rounds differently), so make it so: decode one
        # more token, or evaluate the last one again by itself. Not where compress_now() has just
        # scored it (see below).
        if self.rng.random() < 0.5:
            self.greedy(1)
            self.scored_to_end = False
        elif not self.scored_to_end:
            last = self.tokens[-1]
            assert llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens - 1, -1)
            llm.n_tokens -= 1
            self.eval_checked([last])
        n = int(self.rng.integers(1, 12))
        held = llm.n_tokens
        restore = save()
        first, logits, gaps = self.generate(n)
        stats_first = llm.kv_stats()
        if self.rng.random() < 0.5:
            llm.reset()
        self.eval_checked(random_tokens(self.rng, int(self.rng.integers(1, b))))
        restore()
        assert self.llm.n_tokens == held
        second, logits_again, _ = self.generate(n)
        if self.scored_to_end:
            # compress_now() scored the newest token: its re-evaluation is refused and the restored
            # prompt is evaluated from scratch (Llama.compress_now's note)
            assert self.llm.kv_stats().prompt_tokens_evaluated == held
            # evaluated from scratch, the cache's last compression came before its newest token again
            self.scored_to_end = False
            return
        assert self.llm.kv_stats().prompt_tokens_evaluated == 1
        if self.n_swa:
            # llama.cpp restores an iSWA memory's cells elsewhere than they were, so the re-evaluated
            # token's logits round differently (without a budget too: up to 8e-4 on a tiny gemma3 with
            # q8_0 K/V and flash attention; 6e-3 seen here after truncations): close, and the same
            # greedy tokens but after a near tie (tests/near_tie.py)
            np.testing.assert_allclose(logits_again, logits, rtol=0, atol=2e-2)
            assert_same_greedy(first, gaps, second)
        else:
            np.testing.assert_array_equal(logits_again, logits)
            assert second == first
        s = self.llm.kv_stats()
        assert (s.compressions, s.cells_used, s.n_tokens, s.evicted_tokens) == (
            stats_first.compressions, stats_first.cells_used, stats_first.n_tokens, stats_first.evicted_tokens)

    def save(self) -> Callable[[], None]:
        state = self.llm.save_state()
        return lambda: self.llm.load_state(state)

    def op_save_load(self) -> Optional[bool]:
        return self.continuation_check(self.save)

    def op_save_load_file(self) -> Optional[bool]:
        """A state pickled to a file (as llama-cpp-python's disk cache does), loaded into a new
        instance half of the time."""

        def save() -> Callable[[], None]:
            path = self.tmp / "state.pkl"
            path.write_bytes(pickle.dumps(self.llm.save_state()))

            def restore() -> None:
                state = pickle.loads(path.read_bytes())
                if self.rng.random() < 0.5:
                    self.llm.close()
                    self.llm = self.new_llama()
                self.llm.load_state(state)
            return restore

        return self.continuation_check(save)

    def op_reset(self) -> None:
        self.llm.reset()
        s = self.llm.kv_stats()
        assert (self.llm.n_tokens, s.cells_used, s.compressions, s.n_tokens) == (0, 0, 0, 0)

    def op_reopen(self) -> None:
        self.open(str(self.rng.choice(METHODS)), int(self.rng.choice([B, B + 8, 2 * B])))

    # -- invariants ------------------------------------------------------

    def check(self) -> None:
        llm = self.llm
        n = llm.n_tokens
        s = llm.kv_stats()
        assert s.n_tokens == n, (s.n_tokens, n)
        mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
        assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == n - 1
        assert s.cells_kept <= self.case.keep
        assert s.cells_used <= s.cells_kept + self.budget + b and s.cells_peak <= self.case.keep + self.budget + b
        assert s.cells_used == n if s.compressions == 0 else s.cells_used <= n
        assert s.kv_bytes_used == s.cells_used * self.per_cell and s.kv_bytes_full == n * self.per_cell
        if self.n_swa and n:
            # the window layers hold at least the window of the next token
            assert llama_cpp.llama_memory_seq_pos_min(mem, 0) <= max(0, n - self.n_swa + 1)
            assert s.kv_bytes_window > 0
        for layer, head in self.heads:
            kept = llm.kept_positions(layer, head)
            assert len(kept) == s.cells_used
            if n:
                assert kept[0] >= 0 and kept[-1] == n - 1 and np.all(np.diff(kept) > 0)
                np.testing.assert_array_equal(kept[:s.cells_kept], np.arange(s.cells_kept))  # the prompt, whole
                window = np.arange(max(0, n - WINDOW), n)   # the newest tokens are always held
                assert np.isin(window, kept).all(), (layer, head, np.setdiff1d(window, kept))


# ---------------------------------------------------------------------------
# several sequences of one context, through llama.cpp's API
# ---------------------------------------------------------------------------

class StreamsFuzz:
    """Sequences in separate streams of one compressed context, as BatchedLlama drives them."""

    N_SEQ = 3

    def __init__(self, model, ctx, rng: np.random.Generator) -> None:
        self.model, self.ctx, self.rng = model, ctx, rng
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.length = [0] * self.N_SEQ
        self.heads = [(layer, head) for layer in range(llama_cpp.llama_model_n_layer(model))
                      for head in range(llama_cpp.llama_model_n_head_kv(model))]
        self.ops: dict[str, Callable[[], None]] = {
            "decode": self.op_decode, "seq_rm_tail": self.op_seq_rm_tail, "seq_clear": self.op_seq_clear,
            "seq_cp": self.op_seq_cp, "compress": self.op_compress, "seq_state": self.op_seq_state,
        }
        self.choose = OperationChooser(rng, list(self.ops), np.array([30, 6, 2, 4, 4, 4], dtype=float))
        self.watch = SpecWatch(ctx, "rkv", shape_of(model), reference.ScoringParams(budget=B, window=WINDOW),
                               every=SPEC_EVERY)

    def step(self) -> tuple[str, bool]:
        name = self.choose()
        ran = self.ops[name]() is not False
        self.check()
        return name, ran

    def logits(self, i: int = -1) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()

    def op_decode(self) -> None:
        # one call carries at most b tokens per stream (the engine's rule)
        seqs = [s for s in range(self.N_SEQ) if self.rng.random() < 0.6] or [int(self.rng.integers(self.N_SEQ))]
        chunks = []
        for s in seqs:
            n = int(self.rng.integers(1, b + 1))
            chunks.append((s, random_tokens(self.rng, n), self.length[s]))
            self.length[s] += n
        decode(self.ctx, chunks)

    def op_seq_rm_tail(self) -> None:
        s = int(self.rng.integers(self.N_SEQ))
        p = int(self.rng.integers(0, self.length[s] + 1))
        before = _native.seq_stats(self.ctx, s)
        scored = before.pos_compacted + WINDOW   # the newest position the last compression saw
        if llama_cpp.llama_memory_seq_rm(self.mem, s, p, -1):
            assert before.pos_compacted < 0 or p > scored or p == 0, (p, scored)
            self.length[s] = p
        else:
            assert before.n_compressions > 0 and 0 < p <= scored, (p, scored)
            after = _native.seq_stats(self.ctx, s)
            assert (after.cells_used, after.n_tokens) == (before.cells_used, before.n_tokens)

    def op_seq_clear(self) -> None:
        s = int(self.rng.integers(self.N_SEQ))
        assert llama_cpp.llama_memory_seq_rm(self.mem, s, -1, -1)
        self.length[s] = 0

    def op_seq_cp(self) -> Optional[bool]:
        """Copy a whole sequence into an emptied one: both then go on identically."""
        src, dst = (int(x) for x in self.rng.choice(self.N_SEQ, size=2, replace=False))
        if self.length[src] == 0:
            return False   # nothing to do: not counted as a step that ran
        assert llama_cpp.llama_memory_seq_rm(self.mem, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.length[dst] = self.length[src]
        tok = random_tokens(self.rng, 1)
        for s in (src, dst):
            decode(self.ctx, [(s, tok, self.length[s])])
            self.length[s] += 1
            if s == src:
                expected = self.logits()
        np.testing.assert_array_equal(self.logits(), expected)
        for layer, head in self.heads:
            np.testing.assert_array_equal(_native.kept_positions(self.ctx, layer, head, src),
                                          _native.kept_positions(self.ctx, layer, head, dst))

    def op_compress(self) -> None:
        s = int(self.rng.integers(self.N_SEQ))
        before = _native.seq_stats(self.ctx, s)
        done = _native.compress(self.ctx, s)
        assert done == (before.cells_used > B)
        if done:
            assert _native.seq_stats(self.ctx, s).cells_used == B

    def op_seq_state(self) -> Optional[bool]:
        """Save one sequence, go on, restore it in place: the same next logits and continuation."""
        s = int(self.rng.integers(self.N_SEQ))
        if self.length[s] == 0:
            return False   # nothing to do: not counted as a step that ran
        n = llama_cpp.llama_state_seq_get_size(self.ctx, s)
        buf = (ctypes.c_uint8 * n)()
        assert llama_cpp.llama_state_seq_get_data(self.ctx, buf, n, s) == n
        saved_length = self.length[s]
        tokens = random_tokens(self.rng, int(self.rng.integers(1, b + 1)))
        decode(self.ctx, [(s, tokens, saved_length)])
        first = self.logits()
        stats_first = _native.seq_stats(self.ctx, s)
        decode(self.ctx, [(s, random_tokens(self.rng, 3), saved_length + len(tokens))])  # something else
        assert llama_cpp.llama_state_seq_set_data(self.ctx, buf, n, s) == n
        assert _native.seq_stats(self.ctx, s).n_tokens == saved_length
        decode(self.ctx, [(s, tokens, saved_length)])
        np.testing.assert_array_equal(self.logits(), first)
        after = _native.seq_stats(self.ctx, s)
        assert (after.cells_used, after.n_compressions) == (stats_first.cells_used, stats_first.n_compressions)
        self.length[s] = saved_length + len(tokens)

    def check(self) -> None:
        for s in range(self.N_SEQ):
            n = self.length[s]
            st = _native.seq_stats(self.ctx, s)
            assert st.n_tokens == n, (s, st.n_tokens, n)
            assert llama_cpp.llama_memory_seq_pos_max(self.mem, s) == n - 1
            assert st.cells_used <= B + b and st.cells_peak <= B + b
            assert st.cells_used == n if st.n_compressions == 0 else st.cells_used <= n
            for layer, head in self.heads:
                kept = _native.kept_positions(self.ctx, layer, head, s)
                assert len(kept) == st.cells_used
                if n:
                    assert kept[-1] == n - 1 and np.all(np.diff(kept) > 0)


# ---------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------

def run_fuzz(fuzz, steps: int, label: str) -> dict[str, int]:
    """Run `steps` random operations; how many of each ran (an operation with nothing to do is not
    counted: 'skipped')."""
    done: dict[str, int] = {}
    history: list[str] = []
    for i in range(steps):
        try:
            name, ran = fuzz.step()
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            raise FuzzFailure(f"{label}: step {i} failed after {history[-12:]}, at line {where.lineno} "
                              f"({where.line}): {exc!r}") from exc
        history.append(name)
        key = name if ran else "skipped"
        done[key] = done.get(key, 0) + 1
    return done


def steps_of(request: pytest.FixtureRequest, default: int) -> int:
    return request.config.getoption("--fuzz-steps") or default


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fuzz_one_sequence(case: Case, request, tiny_model, smollm2_path, tmp_path) -> None:
    path = tiny_model(**case.model) if case.model else smollm2_path
    seed = request.config.getoption("--fuzz-seed") + CASES.index(case)
    steps = steps_of(request, case.steps)
    fuzz = LlamaFuzz(path, case, np.random.default_rng(seed), tmp_path)
    try:
        done = run_fuzz(fuzz, steps, f"{case.name} (seed {seed})")
    finally:
        fuzz.close()
    print(f"{case.name}: {steps} steps {done}")
    assert sum(done.values()) == steps
    missing = set(fuzz.ops) - set(done)
    assert not missing or steps < case.steps, f"operations that never ran: {missing}"
    assert sum(w.compared for w in fuzz.watches) > 0 or case.model.get("arch") == "gpt-oss"


@pytest.mark.parametrize("flash_attn", [llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED],
                         ids=["no-fa", "fa"])
def test_fuzz_parallel_sequences(flash_attn: int, request, tiny_model) -> None:
    model = llama_cpp.llama_model_load_from_file(str(tiny_model(arch="llama")).encode(),
                                                 llama_cpp.llama_model_default_params())
    assert model
    seed = request.config.getoption("--fuzz-seed") + 100 + flash_attn
    steps = steps_of(request, 300)
    try:
        n_seq = StreamsFuzz.N_SEQ
        with low_level_context(model, n_ctx=256 * n_seq, n_seq_max=n_seq, n_batch=b * n_seq,
                               flash_attn=flash_attn, n_threads=1) as ctx:
            _native.enable(ctx, _native.CompressionConfig(budget=B, buffer=b))
            fuzz = StreamsFuzz(model, ctx, np.random.default_rng(seed))
            done = run_fuzz(fuzz, steps, f"parallel sequences (seed {seed})")
    finally:
        llama_cpp.llama_model_free(model)
    print(f"parallel sequences: {steps} steps {done}")
    assert sum(done.values()) == steps
    assert not set(fuzz.ops) - set(done), f"operations that never ran: {set(fuzz.ops) - set(done)}"
    assert fuzz.watch.compared > 0 and not fuzz.watch.failures, fuzz.watch.failures[:3]
