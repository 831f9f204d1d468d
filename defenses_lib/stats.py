"""Uncertainty for the book's numbers: intervals for accuracies, paired tests and intervals for the
difference of two defenses (or two attacks) on the same test images, intervals for timing ratios and
summaries over training seeds.

Per-example outcomes are what every evaluation keeps (``RobustResult.correct``): a bool per example
for a deterministic defense, or a probability of being right (the fraction of repeated predictions
that are right) for a randomized one. Binary outcomes get exact or score methods (Wilson,
Clopper-Pearson, exact McNemar, Newcombe's paired score interval); fractional outcomes, for which no
exact binomial method exists, get Wilson's interval at their mean (conservative) and, for differences,
a seeded paired bootstrap. Every function is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps

BOOTSTRAP_DRAWS = 10_000  # resamples of a bootstrap interval; its seed is fixed, so intervals are reproducible


def _check_level(level: float) -> None:
    """Raise unless 0 < level < 1."""
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")


def _check_counts(k, n) -> None:
    """Raise unless 0 <= k <= n are integers and n >= 1."""
    integers = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (k, n))
    if not integers or not 0 <= k <= n or n < 1:
        raise ValueError(f"counts must be integers with 0 <= k <= n and n >= 1, got k={k!r}, n={n!r}")


def outcomes(values) -> np.ndarray:
    """Per-example outcomes as a float array in [0, 1] (bools become 0 and 1); raises on anything else."""
    a = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"outcomes must be a non-empty 1-D sequence, got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all() or (a < 0).any() or (a > 1).any():
        raise ValueError("outcomes must be finite values in [0, 1] (right/wrong, or a probability of being right)")
    return a


def is_binary(a: np.ndarray) -> bool:
    """Whether every outcome is 0 or 1."""
    return bool(np.isin(a, (0.0, 1.0)).all())


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion k / n."""
    _check_counts(k, n)
    return _wilson_p(k / n, n, level)


def _wilson_p(p: float, n: int, level: float) -> tuple[float, float]:
    """Wilson's interval for an observed proportion p on n examples."""
    _check_level(level)
    z = sps.norm.ppf(0.5 + level / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval for a binomial proportion k / n."""
    _check_counts(k, n)
    _check_level(level)
    a = (1 - level) / 2
    low = 0.0 if k == 0 else sps.beta.ppf(a, k, n - k + 1)
    high = 1.0 if k == n else sps.beta.ppf(1 - a, k + 1, n - k)
    return float(low), float(high)


def bootstrap_mean(values, level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval for the mean of per-example values (seeded, so reproducible)."""
    _check_level(level)
    a = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(draws, len(a)))
    means = a[idx].mean(1)
    q = (1 - level) / 2
    return float(np.quantile(means, q)), float(np.quantile(means, 1 - q))


@dataclass(frozen=True)
class Estimate:
    """A quantity, its interval at ``level`` and how it was computed; shows as '84.0 [71.5, 91.7]' (percent)."""

    value: float
    low: float
    high: float
    n: int
    method: str
    level: float = 0.95
    scale: float = 100.0   # shown in percent; 1 for a plain number (a ratio)
    digits: int = 1

    def shown(self, v: float) -> str:
        """v in this estimate's scale and digits."""
        return f"{self.scale * v:.{self.digits}f}"

    def __str__(self) -> str:
        return f"{self.shown(self.value)} [{self.shown(self.low)}, {self.shown(self.high)}]"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def accuracy_interval(correct, level: float = 0.95) -> Estimate:
    """Accuracy over examples with Wilson's interval.

    For probabilities of being right (a randomized defense) the interval is Wilson's at their mean,
    which is conservative: a value in [0, 1] with mean p has a variance of at most p (1 - p).
    """
    a = outcomes(correct)
    low, high = _wilson_p(float(a.mean()), len(a), level)
    return Estimate(float(a.mean()), low, high, len(a), "Wilson" if is_binary(a) else "Wilson (conservative)", level)


def mcnemar(a, b) -> dict:
    """The exact McNemar test of two binary outcome vectors on the same examples.

    ``b10``: examples right under a and wrong under b; ``b01`` the reverse. Under the null hypothesis
    (same accuracy) each discordant example is a fair coin. Returns both counts, the one-sided p-value
    for "a is more accurate than b" (``p_greater``), the one for the reverse (``p_less``) and the
    two-sided one (``p``), each from the binomial distribution of ``b10`` given ``b10 + b01``.
    """
    a, b = _paired(a, b)
    if not (is_binary(a) and is_binary(b)):
        raise ValueError("mcnemar needs right/wrong outcomes; use paired_difference for probabilities")
    b10, b01 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    m = b10 + b01
    if m == 0:
        return {"b10": 0, "b01": 0, "p_greater": 1.0, "p_less": 1.0, "p": 1.0}
    p_greater = float(sps.binom.sf(b10 - 1, m, 0.5))
    p_less = float(sps.binom.cdf(b10, m, 0.5))
    return {"b10": b10, "b01": b01, "p_greater": p_greater, "p_less": p_less, "p": min(1.0, 2 * min(p_greater, p_less))}


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Two outcome vectors of the same length (the same examples)."""
    a, b = outcomes(a), outcomes(b)
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must be on the same examples, got lengths {len(a)} and {len(b)}")
    return a, b


def newcombe_paired(a, b, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's score interval (his method 10) for the difference of two accuracies on the same examples."""
    a, b = _paired(a, b)
    n = len(a)
    both, only_a = float(((a == 1) & (b == 1)).sum()), float(((a == 1) & (b == 0)).sum())
    only_b, neither = float(((a == 0) & (b == 1)).sum()), float(((a == 0) & (b == 0)).sum())
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(int(both + only_a), n, level)
    l2, u2 = wilson(int(both + only_b), n, level)
    denom = math.sqrt((both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither))
    phi = (both * neither - only_a * only_b) / denom if denom > 0 else 0.0
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, low), min(1.0, high)


def newcombe_unpaired(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for k1/n1 - k2/n2 on independent samples (his method 10 of 1998a)."""
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    return _newcombe_means(k1 / n1, n1, k2 / n2, n2, level)


def _newcombe_means(p1: float, n1: int, p2: float, n2: int, level: float) -> tuple[float, float]:
    """Newcombe's hybrid interval for p1 - p2, two mean outcomes on n1 and n2 examples, ignoring any pairing."""
    l1, u1 = _wilson_p(p1, n1, level)
    l2, u2 = _wilson_p(p2, n2, level)
    return p1 - p2 - math.hypot(p1 - l1, u2 - p2), p1 - p2 + math.hypot(u1 - p1, p2 - l2)


def paired_difference(a, b, level: float = 0.95) -> Estimate:
    """Accuracy of a minus accuracy of b on the same examples, with its interval.

    Newcombe's paired score interval when both are right/wrong outcomes, else a paired bootstrap
    (examples resampled together, so the pairing is kept).
    """
    a, b = _paired(a, b)
    if is_binary(a) and is_binary(b):
        low, high = newcombe_paired(a, b, level)
        return Estimate(a.mean() - b.mean(), low, high, len(a), "Newcombe paired", level)
    if np.ptp(a - b) == 0:  # no spread to resample: the conservative unpaired interval of the two means
        low, high = _newcombe_means(float(a.mean()), len(a), float(b.mean()), len(b), level)
        return Estimate(a.mean() - b.mean(), low, high, len(a), "Newcombe on the means", level)
    low, high = bootstrap_mean(a - b, level)
    return Estimate(a.mean() - b.mean(), low, high, len(a), "paired bootstrap", level)


def mean_interval(values, level: float = 0.95, digits: int = 3) -> Estimate:
    """The mean of real-valued per-example measurements (a curvature, a cosine) with a bootstrap interval."""
    a = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if a.ndim != 1 or a.size < 2 or not np.isfinite(a).all():
        raise ValueError(f"values must be a finite 1-D sequence of at least 2 measurements, got shape {a.shape}")
    low, high = bootstrap_mean(a, level)
    return Estimate(float(a.mean()), low, high, len(a), "bootstrap", level, scale=1.0, digits=digits)


def paired_mean_difference(a, b, level: float = 0.95) -> Estimate:
    """Mean of a minus mean of b for real-valued measurements on the same examples, with a paired bootstrap
    interval (shown as a plain number, not a percentage)."""
    a, b = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (a, b))
    if a.ndim != 1 or a.shape != b.shape or a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"paired measurements must be two finite 1-D sequences of the same length >= 2, "
                         f"got shapes {a.shape} and {b.shape}")
    low, high = bootstrap_mean(a - b, level)
    return Estimate(float(a.mean() - b.mean()), low, high, len(a), "paired bootstrap", level, scale=1.0, digits=3)


@dataclass(frozen=True)
class Proportion:
    """An accuracy known only as k right of n (no per-example outcomes: a stored result, a paper's number)."""

    k: int
    n: int

    def __post_init__(self):
        _check_counts(self.k, self.n)

    @classmethod
    def of(cls, accuracy: float, n: int) -> "Proportion":
        """The proportion for an accuracy in [0, 1] on n examples (rounded to whole examples)."""
        return cls(int(round(accuracy * n)), n)


def proportion_interval(p: Proportion, level: float = 0.95) -> Estimate:
    """Wilson's interval for a stored proportion."""
    low, high = wilson(p.k, p.n, level)
    return Estimate(p.k / p.n, low, high, p.n, "Wilson", level)


def unpaired_difference(a: Proportion, b: Proportion, level: float = 0.95) -> Estimate:
    """a - b for two accuracies on independent (or unknown) samples: Newcombe's interval, wider than a paired one."""
    low, high = newcombe_unpaired(a.k, a.n, b.k, b.n, level)
    return Estimate(a.k / a.n - b.k / b.n, low, high, min(a.n, b.n), "Newcombe unpaired", level)


def ratio_interval(times_a, times_b, level: float = 0.95) -> Estimate:
    """The ratio of two timings from paired rounds: the geometric mean of the per-round ratios a/b with a
    t interval on their logarithms (a ratio below 1 means a is faster)."""
    _check_level(level)
    a, b = np.asarray(times_a, dtype=np.float64), np.asarray(times_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2 or (a <= 0).any() or (b <= 0).any():
        raise ValueError(f"timings must be two equally long sequences of at least 2 positive paired rounds, "
                         f"got lengths {len(a)} and {len(b)}")
    logs = np.log(a / b)
    half = sps.t.ppf(0.5 + level / 2, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    m = logs.mean()
    return Estimate(math.exp(m), math.exp(m - half), math.exp(m + half), len(logs), "t on log ratios", level,
                    scale=1.0, digits=2)


def pooled(per_seed) -> torch.Tensor:
    """Per-example outcomes averaged over training seeds (the same test images in each), as floats."""
    lengths = {len(t) for t in per_seed}
    if len(lengths) != 1:
        raise ValueError(f"per_seed must hold outcomes on the same test images, got lengths {sorted(lengths)}")
    return torch.stack([torch.as_tensor(t).float() for t in per_seed]).mean(0)


@dataclass(frozen=True)
class OverSeeds:
    """An accuracy over training seeds: the interval of the per-image mean over the seeds (``pooled``), and
    each seed's own accuracy on the same images."""

    pooled: Estimate
    per_seed: tuple[float, ...]

    @property
    def sd(self) -> float:
        """The standard deviation of the seeds' accuracies (NaN for one seed)."""
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else float("nan")

    def __str__(self) -> str:
        return f"{self.pooled}, sd {100 * self.sd:.1f} over {len(self.per_seed)} seeds"


def over_seeds(per_seed, level: float = 0.95) -> OverSeeds:
    """Per-example outcomes of each seed (the same images, or a common prefix of them) as an OverSeeds."""
    n = min(len(t) for t in per_seed)
    cut = [torch.as_tensor(t)[:n] for t in per_seed]
    return OverSeeds(accuracy_interval(pooled(cut), level), tuple(float(t.double().mean()) for t in cut))


def seed_summary(values, level: float = 0.95) -> dict:
    """Mean, standard deviation and a t interval for the mean of one number measured over training seeds."""
    _check_level(level)
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or len(a) < 1 or not np.isfinite(a).all():
        raise ValueError(f"values must be a non-empty 1-D sequence of finite numbers, got {values!r}")
    if len(a) == 1:
        return {"mean": float(a[0]), "sd": float("nan"), "low": float("nan"), "high": float("nan"), "seeds": 1}
    sd = a.std(ddof=1)
    half = sps.t.ppf(0.5 + level / 2, len(a) - 1) * sd / math.sqrt(len(a))
    return {"mean": float(a.mean()), "sd": float(sd), "low": float(a.mean() - half), "high": float(a.mean() + half),
            "seeds": len(a)}


def auc(score, label) -> float:
    """P(score of a positive > score of a negative), ties counting half: Mann-Whitney's U / (n1 n0)."""
    s, lab = np.asarray(score, dtype=np.float64), np.asarray(label).astype(bool)
    if s.shape != lab.shape or lab.all() or not lab.any():
        raise ValueError(f"score and label must have one shape and label both classes, got {s.shape}, {lab.shape}")
    pos, neg = s[lab], s[~lab]
    return float(sps.mannwhitneyu(pos, neg).statistic) / (len(pos) * len(neg))


def _residual(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """v with its least-squares fit on c removed (both centred)."""
    v, c = v - v.mean(), c - c.mean()
    return v - (v @ c) / (c @ c) * c


def partial_spearman(a, b, control) -> float:
    """Spearman correlation of a and b once the ranks of ``control`` are regressed out of both."""
    ra, rb, rc = (sps.rankdata(np.asarray(v, dtype=np.float64)) for v in (a, b, control))
    return float(sps.pearsonr(_residual(ra, rc), _residual(rb, rc)).statistic)


def fisher_interval(r: float, n: int, controls: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Fisher's z interval of a (partial) correlation r on n samples with ``controls`` variables held fixed."""
    _check_level(level)
    if not -1 < r < 1 or n - controls <= 3:
        raise ValueError(f"need -1 < r < 1 and n - controls > 3, got r={r}, n={n}, controls={controls}")
    half = sps.norm.ppf(0.5 + level / 2) / math.sqrt(n - controls - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def spearman_interval(score, outcome, draws: int = 1_000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Spearman's correlation of ``score`` with ``outcome`` and a seeded percentile bootstrap interval."""
    _check_level(level)
    s, o = np.asarray(score, dtype=np.float64), np.asarray(outcome, dtype=np.float64)
    if s.shape != o.shape or s.ndim != 1 or len(s) < 3:
        raise ValueError(f"score and outcome must be 1-D of one length >= 3, got {s.shape} and {o.shape}")
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(draws):
        i = rng.integers(0, len(s), len(s))
        boot.append(sps.spearmanr(s[i], o[i]).statistic)
    low, high = np.quantile(np.nan_to_num(np.asarray(boot)), [0.5 - level / 2, 0.5 + level / 2])
    r = float(sps.spearmanr(s, o).statistic)
    return Estimate(r, float(low), float(high), len(s), "percentile bootstrap", level, scale=1.0, digits=3)
