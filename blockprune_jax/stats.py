"""Error bars for a study run over several seeds: mean ± std and paired 95 % t-intervals.

Pure numbers (numpy; no scipy, which is not a dependency). Two settings run with the same
seeds are compared seed by seed (a paired test): the seed's shared effect (data order,
initialisation) cancels in the difference, so the interval is much tighter than comparing
two independent means.
"""
import math
from typing import Optional, Sequence

import numpy as np

# Two-sided 95 % Student-t critical values t_{0.975}(df) for df = 1..30 (index df - 1).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054  # the normal quantile the t quantile tends to as df grows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample standard deviation with ddof=1) of [n] values; the std is 0 when n == 1."""
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    raise ValueError("mean_std needs at least one value")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def t_quantile_975(df: int) -> float:
  """t_{0.975}(df), the two-sided 95 % Student-t critical value, for df >= 1 degrees of freedom.

  A table (6 decimals) up to df 30; beyond, the Cornish-Fisher expansion of t around the normal
  quantile z in powers of 1/df (Abramowitz & Stegun 26.7.5), which is within 1e-6 there.
  """
  if int(df) != df or df < 1:
    raise ValueError(f"df={df}: degrees of freedom must be a positive integer")
  df = int(df)
  if df <= len(_T975):
    return _T975[df - 1]
  z = _Z975
  g1 = (z**3 + z) / 4
  g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
  g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
  g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
  return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
  """Mean difference a - b over seeds with its 95 % t-interval.

  Args:
    a, b: [n] per-seed values of two settings, the same seeds in the same order.
  Returns:
    dict(mean, std (ddof=1), n, ci_low, ci_high, significant): the interval is
    mean ± t_{0.975}(n-1) std / sqrt(n); significant when it excludes 0. With n < 2 there is
    no spread to estimate, so ci_low = ci_high = None and significant is False.
  """
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  if a.size != b.size or a.size == 0:
    raise ValueError(f"paired_difference needs the same seeds for both settings: got {a.size} "
                     f"and {b.size} values")
  mean, std = mean_std(a - b)
  n = int(a.size)
  if n < 2:
    return dict(mean=mean, std=std, n=n, ci_low=None, ci_high=None, significant=False)
  half = t_quantile_975(n - 1) * std / math.sqrt(n)
  low, high = mean - half, mean + half
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
  """One sentence on a paired_difference(a, b) result, naming the winner first.

  E.g. "linear beats uniform by 0.42 perplexity (95 % CI 0.10 to 0.74, 3 seeds): significant."
  The margin (positive) and its interval are the winner's advantage in `metric` units.
  """
  mean, low, high, n = diff["mean"], diff["ci_low"], diff["ci_high"], diff["n"]
  # a wins when its values are better: a lower a - b for a lower-is-better metric.
  sign = -1.0 if lower_is_better else 1.0
  gain = sign * mean  # a's advantage over b; b's is -gain
  ci = None if low is None else sorted((sign * low, sign * high))  # interval of a's advantage
  if gain < 0:
    name_a, name_b, gain = name_b, name_a, -gain
    ci = None if ci is None else [-ci[1], -ci[0]]
  d = _decimals(gain, *(ci or []))
  seeds = f"{n} seed{'s' if n != 1 else ''}"
  end = "significant." if diff["significant"] else "not significant."
  if gain == 0:
    head = f"{name_a} and {name_b} tie on {metric}"
  else:
    head = f"{name_a} beats {name_b} by {gain:.{d}f} {metric}"
  if ci is None:
    return f"{head} ({seeds}, no interval): {end}"
  return f"{head} (95 % CI {ci[0]:.{d}f} to {ci[1]:.{d}f}, {seeds}): {end}"
