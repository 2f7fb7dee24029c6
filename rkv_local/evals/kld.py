"""llama.cpp's way of judging a changed model: the statistics ``llama-perplexity --kl-divergence``
prints (mean KLD with its standard error, median, upper percentiles and maximum of the per-token
KLD, same top-1 token, Δp of the actual next token, ln PPL ratio), from per-position figures, and a
reader of its ``--kl-divergence-base`` file (used to check that both mean the same thing).

The formulas are the tool's: a standard error is ``sqrt((E[x²] − E[x]²) / (n − 1))`` (0 for ten
positions or fewer), a percentile interpolates linearly between sorted values, Δp is
``p(next token) − p_base(next token)``, and the error of a proportion is binomial.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

# the tool's percentiles of the per-token KLD, high to low (the median is printed apart)
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0)
# what the tool reads as "the base model gives this token no probability" in a base file
BASE_LOG_PROB_FLOOR = -16.0
BASE_MAGIC = b"_logits_"


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error, as llama-perplexity computes them."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    var = float(np.mean(x * x)) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def _covariance(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(a.mean()) * float(b.mean())) / (n - 1)


@dataclass(frozen=True)
class KLDStats:
    """One configuration against the full cache, over a set of positions (KLD in nats, Δp and
    proportions as fractions)."""

    positions: int
    kld_mean: float
    kld_mean_error: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p99_9: float
    kld_max: float
    same_top1: float
    same_top1_error: float
    dp_mean: float
    dp_mean_error: float
    dp_rms: float
    dp_rms_error: float
    nll_diff: float          # mean ln PPL(compressed) − ln PPL(full)
    nll_diff_error: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def percentile(self, name: str) -> float:
        """``"p99"`` → ``kld_p99``; ``"median"``, ``"mean"`` and ``"max"`` too."""
        return float(getattr(self, f"kld_{name.replace('.', '_')}"))


def kld_statistics(kld: np.ndarray, same_top1: np.ndarray, nll: np.ndarray,
                   nll_base: np.ndarray) -> Optional[KLDStats]:
    """The statistics over per-position KL(base ‖ other), top-1 agreement and the two models'
    negative log-likelihoods of the actual next token; None without positions."""
    n = len(kld)
    if n == 0:
        return None
    kld = np.asarray(kld, dtype=np.float64)
    nll = np.asarray(nll, dtype=np.float64)
    nll_base = np.asarray(nll_base, dtype=np.float64)
    ordered = np.sort(kld)
    upper = np.percentile(ordered, KLD_PERCENTILES)
    kld_mean, kld_error = mean_and_error(kld)
    same = float(np.mean(same_top1))
    dp = np.exp(-nll) - np.exp(-nll_base)
    dp_mean, dp_error = mean_and_error(dp)
    mse, mse_error = mean_and_error(dp * dp)
    rms = math.sqrt(mse)
    nll_mean, nll_error = mean_and_error(nll)
    base_mean, base_error = mean_and_error(nll_base)
    diff_var = nll_error ** 2 + base_error ** 2 - 2.0 * _covariance(nll, nll_base)
    return KLDStats(
        positions=n, kld_mean=kld_mean, kld_mean_error=kld_error, kld_median=float(np.median(ordered)),
        kld_p90=float(upper[3]), kld_p95=float(upper[2]), kld_p99=float(upper[1]), kld_p99_9=float(upper[0]),
        kld_max=float(ordered[-1]),
        same_top1=same, same_top1_error=math.sqrt(same * (1.0 - same) / (n - 1)) if n > 1 else 0.0,
        dp_mean=dp_mean, dp_mean_error=dp_error, dp_rms=rms, dp_rms_error=0.5 / rms * mse_error if rms > 0 else 0.0,
        nll_diff=nll_mean - base_mean, nll_diff_error=math.sqrt(max(diff_var, 0.0)),
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities (float32, summed in float64 as llama.cpp does)."""
    x = np.array(logits, dtype=np.float32, ndmin=2)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return x


@dataclass
class PositionFigures:
    """Per-position comparisons of a model's next-token distributions with the base model's."""

    kld: np.ndarray
    same_top1: np.ndarray
    nll: np.ndarray
    nll_base: np.ndarray


def compare_positions(base_log_probs: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> PositionFigures:
    """KL(base ‖ other), same top-1 and both NLLs of ``targets``, from the base model's
    log-probabilities and the other model's logits (rows are positions). As in llama-perplexity,
    tokens to which the base gives a log-probability of −16 or less are left out of the KLD."""
    lp = log_softmax(logits)
    rows = np.arange(len(targets))
    counted = base_log_probs > BASE_LOG_PROB_FLOOR
    terms = np.exp(base_log_probs) * (base_log_probs - lp)
    return PositionFigures(
        kld=np.sum(terms, axis=1, where=counted, dtype=np.float64),
        same_top1=lp.argmax(axis=1) == base_log_probs.argmax(axis=1),
        nll=-lp[rows, targets].astype(np.float64),
        nll_base=-base_log_probs[rows, targets].astype(np.float64),
    )


@dataclass
class KLDBase:
    """A ``llama-perplexity --kl-divergence-base`` file: ``n_chunk`` chunks of ``n_ctx`` tokens, and
    for each chunk the base model's log-probabilities at the positions the tool scores (the second
    half of the chunk, ``n_ctx // 2`` to ``n_ctx − 2``, each predicting the following token)."""

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray        # [n_chunk, n_ctx]
    _offset: int

    @classmethod
    def read(cls, path: Path) -> "KLDBase":
        with open(path, "rb") as f:
            if f.read(8) != BASE_MAGIC:
                raise ValueError(f"{path} is not a llama-perplexity log-probability file")
            n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype="<i4")
            tokens = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype="<i4").reshape(n_chunk, n_ctx)
            return cls(Path(path), int(n_ctx), int(n_vocab), tokens.copy(), f.tell())

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    def chunks(self) -> Iterator[np.ndarray]:
        """Per chunk, the dequantized log-probabilities ``[n_ctx − 1 − n_ctx//2, n_vocab]``."""
        row = 2 * ((self.n_vocab + 1) // 2) + 4
        n_rows = self.n_ctx - 1 - self.first
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            for _ in range(len(self.tokens)):
                raw = np.frombuffer(f.read(2 * row * n_rows), dtype="<u2").reshape(n_rows, row)
                head = raw[:, :4].copy().view("<f4")          # scale, minimum log-probability
                lp = head[:, :1] * raw[:, 4:4 + self.n_vocab].astype(np.float32) + head[:, 1:2]
                yield lp
