"""Is a difference in a table noise? Intervals over seeds and a paired test over test examples.

- Over seeds: mean ± the half-width of a 95% Student-t confidence interval (scipy.stats.t); one seed
  has no interval.
- Method against a reference: a paired bootstrap over test examples. Seed s of the method pairs with
  seed s of the reference when both were scored on the same examples in the same order (the example
  ids in result.json). Each (seed, test set) is a stratum; a resample draws example indices with
  replacement within every stratum, the same indices for both methods, recomputes each stratum's
  metric (so MCC and Pearson are recomputed, not averaged) and takes the mean over strata. The
  interval is the 2.5-97.5 percentile of the resampled differences; p is two-sided,
  2·min(share ≤ 0, share ≥ 0) with the +1 correction, so p < 0.05 about when 0 is outside the interval.
scipy.stats.bootstrap has no strata (seeds and sets must be resampled apart), hence numpy here.
"""
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

LEVEL = 0.95
RESAMPLES = 1000
SEED = 0


def t_interval(values: list[float], level: float = LEVEL) -> float | None:
    """Half-width of the Student-t interval of the mean; None for fewer than two values."""
    if len(values) < 2:
        return None
    return t_interval_from_std(float(np.std(values, ddof=1)), len(values), level)


def t_interval_from_std(std: float, n: int, level: float = LEVEL) -> float:
    """The same from a sample std (n − 1) of n values (a table's CSV keeps std and n)."""
    return float(sps.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)


@dataclass
class Stratum:
    """One seed's (or one test set's) examples of a method: what the metric needs."""
    ids: list[str]
    metric: str                       # "accuracy" (from `correct`) or a GLUE metric name
    correct: np.ndarray | None = None
    prediction: np.ndarray | None = None
    label: np.ndarray | None = None
    glue_task: str | None = None


def stratum(metrics: dict | None, test_set: str | None = None) -> Stratum | None:
    """The per-example data of a metrics dict (of `test_set`'s examples, for a run scored on several
    sets); None when it has none (older runs)."""
    pe = (metrics or {}).get("per_example")
    if isinstance(pe, dict) and isinstance(pe.get("by_task"), dict):
        pe = pe["by_task"].get(test_set)
    if not isinstance(pe, dict) or not pe.get("ids"):
        return None
    ids = pe["ids"].split()
    if "prediction" in pe and pe.get("metric") not in (None, "accuracy"):
        return Stratum(ids, pe["metric"], prediction=np.array(pe["prediction"].split(), dtype=float),
                       label=np.array(pe["label"].split(), dtype=float), glue_task=pe.get("glue_task"))
    if "correct" in pe:
        return Stratum(ids, "accuracy", correct=np.frombuffer(pe["correct"].encode(), dtype=np.uint8) - ord("0"))
    return None


def _metric(s: Stratum, idx: np.ndarray) -> np.ndarray:
    """The stratum's metric on each row of resampled indices idx (resamples × n)."""
    if s.correct is not None:
        return s.correct[idx].mean(axis=1)
    binary = s.metric == "matthews_correlation" and set(np.unique(s.label)) <= {0, 1}
    if s.metric == "pearson" or binary:  # vectorised over resamples: MCC of two 0/1 vectors is their Pearson r
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant resample: r undefined
            r = sps.pearsonr(s.prediction[idx], s.label[idx], axis=1).statistic
        return np.nan_to_num(r, nan=0.0) if binary else r  # sklearn's MCC is 0 when undefined
    from ..tasks import glue_metrics
    with np.errstate(all="ignore"):
        return np.array([glue_metrics(s.glue_task, s.prediction[i], s.label[i])[s.metric] for i in idx])


@dataclass
class Paired:
    delta: float | None = None        # method − reference, in the table's units (×100)
    low: float | None = None
    high: float | None = None
    p: float | None = None
    pairs: int = 0                    # strata paired (seed × test set)
    examples: int = 0
    note: str | None = None           # why there is no test

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < 1 - LEVEL


def paired_test(pairs: list[tuple[Stratum, Stratum]], resamples: int = RESAMPLES, seed: int = SEED) -> Paired:
    """Paired bootstrap of mean-over-strata(metric(A)) − mean-over-strata(metric(B)), ×100."""
    if not pairs:
        return Paired(note="no pair of runs scored on the same examples")
    rng = np.random.default_rng(seed)
    point, boot = 0.0, np.zeros(resamples)
    for a, b in pairs:
        n = len(a.ids)
        whole = np.arange(n)[None, :]
        point += float((_metric(a, whole) - _metric(b, whole))[0])
        for start in range(0, resamples, 200):  # chunks bound the index matrix's memory
            idx = rng.integers(0, n, size=(min(200, resamples - start), n))
            boot[start:start + len(idx)] += _metric(a, idx) - _metric(b, idx)
    point, boot = 100 * point / len(pairs), 100 * boot / len(pairs)
    boot = boot[~np.isnan(boot)]
    if not len(boot) or math.isnan(point):
        return Paired(note="the metric is undefined on these examples")
    low, high = np.percentile(boot, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    tail = min((boot <= 0).sum(), (boot >= 0).sum())
    p = min(1.0, 2 * (tail + 1) / (len(boot) + 1))
    return Paired(point, float(low), float(high), p, len(pairs), sum(len(a.ids) for a, _ in pairs))


def match(a: dict[tuple, Stratum | None], b: dict[tuple, Stratum | None]) -> tuple[list, str | None]:
    """Pair strata by key (seed, test set) where both have per-example data on the same ids in the same
    order; the note says why some or all could not be paired."""
    common = [k for k in a if k in b]
    missing = [k for k in common if a[k] is None or b[k] is None]
    other = [k for k in common if k not in missing and a[k].ids != b[k].ids]
    pairs = [(a[k], b[k]) for k in common if k not in missing and k not in other]
    notes = []
    if not common:
        notes.append("no seed in common")
    if missing:
        notes.append(f"{len(missing)} run pair(s) without per-example scores")
    if other:
        notes.append(f"{len(other)} run pair(s) scored on different examples, not paired")
    return pairs, "; ".join(notes) or None


def one_decimal(x: float) -> str:
    """One decimal, halves rounded up as the paper prints them (72.25 -> 72.3, not 72.2)."""
    return f"{math.floor(x * 10 + 0.5 + 1e-9) / 10:.1f}"


def p_text(p: float) -> str:
    if p <= 2 / (RESAMPLES + 1) + 1e-12:  # no resample crossed 0: the smallest p these resamples can give
        return f"p≤{p:.3f}"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def paired_text(t: Paired) -> str:
    """`+3.1 [+1.0, +5.2], p=0.004`, `n.s.` appended when p ≥ 0.05."""
    def signed(x):
        return ("+" if x >= 0 else "-") + one_decimal(abs(x))
    return (f"{signed(t.delta)} [{signed(t.low)}, {signed(t.high)}], {p_text(t.p)}"
            + ("" if t.significant else " n.s."))
