"""Binary-classification metrics for one label: AUROC with a bootstrap CI, the confusion matrix at a
threshold with Wilson CIs, calibration (ECE, reliability bins) and the Brier score.

Every metric that is undefined for the data at hand (one class only, an empty denominator) is None,
never an exception and never NaN, so reports and JSON show "undefined" honestly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import binomtest, rankdata
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

CONFIDENCE_LEVEL = 0.95
# fewest cases of each class for which a bootstrap AUROC interval is reported
MIN_CLASS_FOR_CI = 2


@dataclass(frozen=True)
class Interval:
    """A confidence interval."""

    low: float
    high: float


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width bin of the reliability diagram; means are None for an empty bin."""

    low: float
    high: float
    count: int
    mean_probability: float | None
    observed_fraction: float | None


@dataclass(frozen=True)
class LabelMetrics:
    """All metrics of one label on one set of cases (the whole test set or one subgroup)."""

    label: str
    threshold: float
    n: int  # cases with a known truth for this label
    n_positive: int
    n_negative: int
    tp: int
    fp: int
    tn: int
    fn: int
    auroc: float | None
    auroc_ci: Interval | None
    bootstrap_resamples: int  # resamples requested
    bootstrap_skipped: int  # resamples with one class only, left out of the CI
    sensitivity: float | None
    sensitivity_ci: Interval | None
    specificity: float | None
    specificity_ci: Interval | None
    ppv: float | None
    ppv_ci: Interval | None
    npv: float | None
    npv_ci: Interval | None
    brier: float | None
    ece: float | None
    reliability: tuple[ReliabilityBin, ...]
    roc_fpr: tuple[float, ...] = field(default=(), repr=False)
    roc_tpr: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; intervals become ``{"low", "high"}`` or None."""
        return asdict(self)


def wilson_interval(successes: int, trials: int, confidence: float = CONFIDENCE_LEVEL) -> Interval | None:
    """Wilson score interval for a proportion (scipy); None when there are no trials."""
    if trials <= 0:
        return None
    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(float(ci.low), float(ci.high))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


def auroc(probabilities: ArrayLike, truths: ArrayLike) -> float | None:
    """Area under the ROC curve (scikit-learn); None when only one class is present."""
    y = np.asarray(truths, dtype=int)
    if y.size == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, np.asarray(probabilities, dtype=float)))


def mann_whitney_auroc(probabilities: NDArray[np.float64], truths: NDArray[np.int_]) -> NDArray[np.float64]:
    """AUROC of each row by the Mann-Whitney rank formula; NaN for rows with one class.

    AUROC = (sum of the positives' ranks - n1 (n1 + 1) / 2) / (n1 n0), with tied probabilities given
    their average rank (a tied positive/negative pair counts one half), which is exactly what
    ``roc_auc_score`` computes. Vectorised over rows so a thousand bootstrap resamples cost milliseconds
    instead of seconds.
    """
    ranks = rankdata(probabilities, axis=1)
    n1 = truths.sum(axis=1).astype(float)
    n0 = truths.shape[1] - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        area = ((ranks * truths).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), area, np.nan)


def bootstrap_auroc_ci(
    probabilities: ArrayLike,
    truths: ArrayLike,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE_LEVEL,
) -> tuple[Interval | None, int]:
    """Percentile bootstrap CI of the AUROC, and how many resamples were skipped (one class only).

    Cases are resampled with replacement ``n_resamples`` times from ``numpy.random.default_rng(seed)``;
    resamples holding a single class have no AUROC and are skipped. The interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the remaining AUROCs. None when
    either class has fewer than ``MIN_CLASS_FOR_CI`` cases (with one positive and one negative every
    usable resample repeats the same pair, and the "interval" would be a single point) or fewer than two
    resamples remain.
    """
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(truths, dtype=int)
    n_positive = int(y.sum())
    if n_resamples <= 0 or min(n_positive, y.size - n_positive) < MIN_CLASS_FOR_CI:
        return None, 0
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // y.size)  # bound memory for large test sets
    values: list[NDArray[np.float64]] = []
    for start in range(0, n_resamples, chunk):
        indices = rng.integers(0, y.size, size=(min(chunk, n_resamples - start), y.size))
        values.append(mann_whitney_auroc(p[indices], y[indices]))
    areas = np.concatenate(values)
    kept = areas[~np.isnan(areas)]
    skipped = int(areas.size - kept.size)
    if kept.size < 2:
        return None, skipped
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(kept, [100 * alpha, 100 * (1 - alpha)])
    return Interval(float(low), float(high)), skipped


def reliability_bins(
    probabilities: ArrayLike, truths: ArrayLike, n_bins: int = 10
) -> tuple[ReliabilityBin, ...]:
    """Equal-width bins over [0, 1]; bin m holds p in [m/M, (m+1)/M), the last bin also holds p = 1."""
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(truths, dtype=float)
    index = np.clip(np.floor(p * n_bins).astype(int), 0, n_bins - 1)
    bins = []
    for m in range(n_bins):
        inside = index == m
        count = int(inside.sum())
        bins.append(
            ReliabilityBin(
                low=m / n_bins,
                high=(m + 1) / n_bins,
                count=count,
                mean_probability=float(p[inside].mean()) if count else None,
                observed_fraction=float(y[inside].mean()) if count else None,
            )
        )
    return tuple(bins)


def expected_calibration_error(bins: tuple[ReliabilityBin, ...]) -> float | None:
    """ECE = sum over bins of (n_bin / n) * |observed fraction - mean probability|; None without cases."""
    total = sum(b.count for b in bins)
    if total == 0:
        return None
    return float(
        sum(
            b.count / total * abs(b.observed_fraction - b.mean_probability)
            for b in bins
            if b.count and b.observed_fraction is not None and b.mean_probability is not None
        )
    )


def choose_threshold(probs: ArrayLike, truths: ArrayLike, sensitivity: float = 0.95) -> float:
    """The highest threshold whose sensitivity (cases with ``p >= threshold`` called positive) is at least
    ``sensitivity``.

    The result is always one of the positive cases' probabilities: the k-th highest, where
    k = ceil(sensitivity * positives). Ties: every case whose probability equals the threshold is called
    positive, so tied positives can only raise the achieved sensitivity above the target, and tied
    negatives are false positives. Among all thresholds that reach the target this is the highest, so it
    has the best specificity. Raises ValueError without positive cases or for a target outside (0, 1].
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"target sensitivity {sensitivity} must be in (0, 1]")
    p = np.asarray(probs, dtype=float)
    y = np.asarray(truths, dtype=int)
    if p.shape != y.shape:
        raise ValueError("probabilities and truths differ in length")
    positive = np.sort(p[y == 1])[::-1]
    if positive.size == 0:
        raise ValueError("no positive cases: a sensitivity target cannot be met")
    k = max(1, math.ceil(sensitivity * positive.size - 1e-9))
    return float(positive[k - 1])


def label_metrics(
    label: str,
    probabilities: ArrayLike,
    truths: ArrayLike,
    threshold: float,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
) -> LabelMetrics:
    """Every metric of one label; a case is called positive when ``probability >= threshold``."""
    p = np.asarray(probabilities, dtype=float).reshape(-1)
    y = np.asarray(truths, dtype=int).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"label {label!r}: probabilities and truths differ in length")
    if p.size and (np.isnan(p).any() or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"label {label!r}: probabilities must lie in [0, 1]")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"label {label!r}: truths must be 0 or 1")
    predicted = p >= threshold
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    tn = int(np.sum(~predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    area = auroc(p, y)
    ci, skipped = bootstrap_auroc_ci(p, y, n_bootstrap, seed) if area is not None else (None, 0)
    if area is not None:
        fpr, tpr, _ = roc_curve(y, p)
        roc_fpr, roc_tpr = tuple(float(v) for v in fpr), tuple(float(v) for v in tpr)
    else:
        roc_fpr, roc_tpr = (), ()
    bins = reliability_bins(p, y, n_bins) if p.size else ()
    return LabelMetrics(
        label=label,
        threshold=float(threshold),
        n=int(y.size),
        n_positive=int(np.sum(y == 1)),
        n_negative=int(np.sum(y == 0)),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        auroc=area,
        auroc_ci=ci,
        bootstrap_resamples=n_bootstrap if area is not None else 0,
        bootstrap_skipped=skipped,
        sensitivity=_ratio(tp, tp + fn),
        sensitivity_ci=wilson_interval(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        specificity_ci=wilson_interval(tn, tn + fp),
        ppv=_ratio(tp, tp + fp),
        ppv_ci=wilson_interval(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        npv_ci=wilson_interval(tn, tn + fn),
        brier=float(brier_score_loss(y, p, pos_label=1)) if y.size else None,
        ece=expected_calibration_error(bins),
        reliability=bins,
        roc_fpr=roc_fpr,
        roc_tpr=roc_tpr,
    )
