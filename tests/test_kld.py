"""eval fidelity's statistics are llama.cpp's: the formulas by hand, and the figures of llama.cpp's own
``llama-perplexity --kl-divergence`` (built by ``make llama-perplexity``) recomputed from its base file."""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rkv_local.evals.datasets import DATA_DIR
from rkv_local.evals.kld import KLDBase, compare_positions, kld_statistics, log_softmax

ROOT = Path(__file__).resolve().parents[1]
PERPLEXITY = ROOT / "build" / "bin" / "llama-perplexity"


def llama_percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile, written out as the tool does it."""
    v = np.sort(values)
    p = fraction * (len(v) - 1)
    i = int(p)
    return float((1 - (p - i)) * v[i] + (p - i) * v[min(i + 1, len(v) - 1)])


def test_statistics_follow_the_tools_formulas():
    rng = np.random.default_rng(7)
    n = 1000
    kld = rng.exponential(0.05, n)
    same = rng.random(n) < 0.9
    nll_base = rng.exponential(1.0, n)
    nll = nll_base + rng.normal(0.01, 0.1, n)
    s = kld_statistics(kld, same, nll, nll_base)
    assert s.positions == n
    assert s.kld_mean == pytest.approx(kld.mean())
    assert s.kld_mean_error == pytest.approx(kld.std() / math.sqrt(n - 1))
    assert s.kld_median == pytest.approx(np.median(kld))
    for name, fraction in (("p90", 0.9), ("p95", 0.95), ("p99", 0.99), ("p99_9", 0.999)):
        assert getattr(s, f"kld_{name}") == pytest.approx(llama_percentile(kld, fraction))
    assert s.kld_max == kld.max() and s.percentile("p99.9") == s.kld_p99_9
    assert s.same_top1 == pytest.approx(same.mean())
    assert s.same_top1_error == pytest.approx(math.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))
    dp = np.exp(-nll) - np.exp(-nll_base)
    assert s.dp_mean == pytest.approx(dp.mean()) and s.dp_rms == pytest.approx(math.sqrt(np.mean(dp * dp)))
    # ln PPL ratio: the difference of means; its error counts the correlation of the two NLLs
    assert s.nll_diff == pytest.approx(nll.mean() - nll_base.mean())
    assert s.nll_diff_error == pytest.approx((nll - nll_base).std() / math.sqrt(n - 1), rel=1e-6)
    # ten positions or fewer: no standard error, as the tool prints
    assert kld_statistics(kld[:10], same[:10], nll[:10], nll_base[:10]).kld_mean_error == 0.0
    assert kld_statistics(np.zeros(0), np.zeros(0, bool), np.zeros(0), np.zeros(0)) is None


def test_compare_positions_by_hand():
    base = np.log(np.array([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]], dtype=np.float32))
    other = np.log(np.array([[0.25, 0.5, 0.25], [0.7, 0.2, 0.1]], dtype=np.float32)) + 3.0   # logits: any offset
    f = compare_positions(base, other, np.array([1, 2]))
    assert f.kld[0] == pytest.approx(0.5 * math.log(2) + 0.25 * math.log(0.5), abs=1e-6)
    assert f.kld[1] == pytest.approx(0.0, abs=1e-6)
    assert list(f.same_top1) == [False, True]
    assert f.nll == pytest.approx([math.log(2), math.log(10)], abs=1e-6)
    assert f.nll_base == pytest.approx([math.log(4), math.log(10)], abs=1e-6)
    # a token the base gives log p ≤ −16 is left out of the KLD, as llama-perplexity does
    tail = np.array([[0.0, -20.0]], dtype=np.float32)
    f = compare_positions(log_softmax(tail), np.array([[0.0, 0.0]], dtype=np.float32), np.array([0]))
    assert f.kld[0] == pytest.approx(math.log(2), abs=1e-5)


def perturbed_copy(model: Path, dest: Path, seed: int = 3) -> Path:
    """The model with its final norm's weights multiplied by noise: another model to compare with."""
    from gguf import GGUFReader

    shutil.copyfile(model, dest)
    tensor = next(t for t in GGUFReader(dest).tensors if t.name == "output_norm.weight")
    data = np.memmap(dest, dtype=np.float32, mode="r+", offset=tensor.data_offset, shape=(int(tensor.n_elements),))
    data *= np.random.default_rng(seed).uniform(0.6, 1.4, data.shape).astype(np.float32)
    data.flush()
    return dest


FIGURES = {
    "kld_mean": r"Mean    KLD:\s+(\S+) ±\s+(\S+)", "kld_max": r"Maximum KLD:\s+(\S+)", "kld_p99_9": r"99\.9%   KLD:\s+(\S+)",
    "kld_p99": r"99\.0%   KLD:\s+(\S+)", "kld_p95": r"95\.0%   KLD:\s+(\S+)", "kld_p90": r"90\.0%   KLD:\s+(\S+)",
    "kld_median": r"Median  KLD:\s+(\S+)", "same_top1": r"Same top p:\s+(\S+) ±\s+(\S+) %",
    "dp_mean": r"Mean    Δp:\s+(\S+) ±\s+(\S+) %", "dp_rms": r"RMS Δp    :\s+(\S+) ±\s+(\S+) %",
    "nll_diff": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s+:\s+(\S+) ±\s+(\S+)",
}


def parse_perplexity_output(text: str) -> dict[str, float]:
    """The final statistics llama-perplexity prints (percentages as fractions)."""
    out = {}
    for name, pattern in FIGURES.items():
        m = re.search(pattern, text)
        assert m, f"llama-perplexity printed no {name}:\n{text[-3000:]}"
        scale = 0.01 if pattern.endswith("%") else 1.0
        out[name] = float(m.group(1)) * scale
        if m.lastindex == 2:
            out[name + "_error"] = float(m.group(2)) * scale
    return out


@pytest.mark.skipif(not PERPLEXITY.exists(), reason="llama-perplexity is not built (make llama-perplexity)")
def test_figures_match_llama_perplexity(smollm2_path, tmp_path):
    """The same two models, the same tokens: llama-perplexity's KLD statistics and ours agree."""
    from rkv_local import Llama, llama_cpp
    from rkv_local.evals.decoding import eval_all_logits

    other = perturbed_copy(smollm2_path, tmp_path / "other.gguf")
    text = tmp_path / "text.txt"
    text.write_text((DATA_DIR / "math500.jsonl").read_text(encoding="utf-8")[:12000], encoding="utf-8")
    base_file = tmp_path / "base.kld"
    n_ctx = 128
    # flash attention off, as in Llama (on, the tool's logits differ in the last digits and its KLD by 1 %)
    common = [str(PERPLEXITY), "-c", str(n_ctx), "-b", str(n_ctx), "-t", "2", "--chunks", "6", "-fa", "off"]
    subprocess.run([*common, "-m", str(smollm2_path), "-f", str(text), "--kl-divergence-base", str(base_file)],
                   check=True, capture_output=True, timeout=600)
    run = subprocess.run([*common, "-m", str(other), "--kl-divergence-base", str(base_file), "--kl-divergence"],
                         check=True, capture_output=True, text=True, timeout=600)
    theirs = parse_perplexity_output(run.stdout + run.stderr)

    base = KLDBase.read(base_file)
    assert base.n_ctx == n_ctx and len(base.tokens) == 6
    llm = Llama(str(other), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, verbose=False)
    try:
        add_bos = llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)
        figures = []
        for tokens, log_probs in zip(base.tokens, base.chunks()):
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
            chunk = [llm.token_bos() if add_bos else int(tokens[0])] + [int(t) for t in tokens[1:]]
            logits = eval_all_logits(llm, chunk)[base.first:n_ctx - 1]
            figures.append(compare_positions(log_probs, logits, tokens[base.first + 1:]))
    finally:
        llm.close()
    ours = kld_statistics(*(np.concatenate([getattr(f, k) for f in figures])
                            for k in ("kld", "same_top1", "nll", "nll_base")))
    assert ours.positions == 6 * (n_ctx - 1 - n_ctx // 2)
    assert theirs["kld_mean"] > 0.01, "the perturbed model should differ measurably"
    for name, value in theirs.items():
        # equal to the digits the tool prints (6 decimals, 3 for percentages)
        assert getattr(ours, name) == pytest.approx(value, rel=1e-4, abs=1e-5), name
