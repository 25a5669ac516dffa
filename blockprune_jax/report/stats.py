"""Error bars over seeds: mean ± std, and paired 95 % t-intervals (scipy). Settings run with the
same seeds are compared seed by seed: the seed's shared effect (data order, initialisation) cancels
in the difference, so the interval is much tighter than the one of two independent means."""
import math
import statistics
import warnings
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std with ddof=1) of [n] values, the std 0 when n == 1; exact sums (fsum), so
  the full-precision CSVs show the same digits however the values were ordered."""
  v = [float(x) for x in np.asarray(values, np.float64).ravel()]
  if not v:
    raise ValueError("mean_std needs at least one value")
  return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
  """dict(mean, std (ddof=1), n, ci_low, ci_high, significant) of a - b over seeds (same seeds,
  same order), with its 95 % t-interval: significant when it excludes 0; none when n < 2."""
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.size != b.size or a.size == 0:
    raise ValueError(f"paired_difference needs the same seeds for both settings: got {a.size} "
                     f"and {b.size} values")
  mean, std = mean_std(a - b)
  n = int(a.size)
  if n < 2:
    return dict(mean=mean, std=std, n=n, ci_low=None, ci_high=None, significant=False)
  with warnings.catch_warnings():  # equal differences: a zero-width interval, not a warning
    warnings.simplefilter("ignore", RuntimeWarning)
    low, high = (float(x) for x in scipy_stats.ttest_rel(a, b).confidence_interval(0.95))
  return dict(mean=mean, std=std, n=n, ci_low=low, ci_high=high,
              significant=bool(low > 0 or high < 0))


def _decimals(*values: Optional[float]) -> int:
  """Decimals that show two significant digits of the largest magnitude (at least 2)."""
  scale = max([abs(v) for v in values if v is not None] + [0.0])
  if scale == 0 or scale >= 0.1:
    return 2
  return min(8, 1 - math.floor(math.log10(scale)))


def verdict(name_a: str, name_b: str, diff: dict, metric: str = "perplexity",
            lower_is_better: bool = True) -> str:
  """One sentence on a paired_difference(a, b), the winner first, e.g. "linear beats uniform by
  0.42 perplexity (95 % CI 0.10 to 0.74, 3 seeds): significant." (the winner's advantage)."""
  sign = -1.0 if lower_is_better else 1.0
  if sign * diff["mean"] < 0:  # b won: it goes first
    name_a, name_b, sign = name_b, name_a, -sign
  gain = sign * diff["mean"]
  ci = [] if diff["ci_low"] is None else sorted((sign * diff["ci_low"], sign * diff["ci_high"]))
  d = _decimals(gain, *ci)
  head = (f"{name_a} and {name_b} tie on {metric}" if gain == 0
          else f"{name_a} beats {name_b} by {gain:.{d}f} {metric}")
  interval = f"95 % CI {ci[0]:.{d}f} to {ci[1]:.{d}f}, " if ci else ""
  seeds = f"{diff['n']} seed{'s' if diff['n'] != 1 else ''}" + ("" if ci else ", no interval")
  return f"{head} ({interval}{seeds}): {'' if diff['significant'] else 'not '}significant."
