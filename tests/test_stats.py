"""Seed statistics: mean ± std, the t quantile (scipy's), paired intervals, verdicts."""
import math

import pytest

from blockprune_jax.report import stats

# Printed tables of t_{0.975}(df) (3 decimals), e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2.
TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000,
         100: 1.984, 120: 1.980}


def test_mean_std():
  assert stats.mean_std([2.0, 4.0, 6.0]) == (4.0, 2.0)  # ddof=1: sqrt((4 + 0 + 4) / 2)
  assert stats.mean_std([3.5]) == (3.5, 0.0)
  with pytest.raises(ValueError):
    stats.mean_std([])


def t_quantile(df: int) -> float:
  """t_{0.975}(df) as paired_difference's interval of df + 1 differences uses it."""
  d = stats.paired_difference(list(range(df + 1)), [0.0] * (df + 1))
  return (d["ci_high"] - d["mean"]) * math.sqrt(df + 1) / d["std"]


@pytest.mark.parametrize("df,want", sorted(TABLE.items()))
def test_t_quantile_matches_the_table(df, want):
  assert t_quantile(df) == pytest.approx(want, abs=5e-4)


def test_t_quantile_falls_towards_the_normal():
  values = [t_quantile(df) for df in range(1, 200)]
  assert all(a > b for a, b in zip(values, values[1:]))  # strictly falling
  assert 1.959964 < values[-1] < 1.9725  # t(199) = 1.97196, above the normal's 1.959964


def test_paired_difference_known_interval():
  # d = a - b = (-0.5, -0.3, -0.5): mean -13/30, std sqrt(0.04/3), t(2) = 4.302653.
  a, b = [30.1, 30.5, 29.9], [30.6, 30.8, 30.4]
  d = stats.paired_difference(a, b)
  half = 4.302653 * math.sqrt(0.04 / 3) / math.sqrt(3)
  assert d["n"] == 3
  assert d["mean"] == pytest.approx(-13 / 30)
  assert d["std"] == pytest.approx(math.sqrt(0.04 / 3))
  assert d["ci_low"] == pytest.approx(-13 / 30 - half, abs=1e-6)
  assert d["ci_high"] == pytest.approx(-13 / 30 + half, abs=1e-6)
  assert d["significant"] is True
  # Swapping the settings mirrors the interval.
  r = stats.paired_difference(b, a)
  assert (r["ci_low"], r["ci_high"]) == pytest.approx((-d["ci_high"], -d["ci_low"]))


def test_paired_difference_not_significant_and_degenerate_cases():
  d = stats.paired_difference([1.0, 2.0, 3.0], [1.5, 1.5, 2.5])  # d = -0.5, 0.5, 0.5
  assert d["ci_low"] < 0 < d["ci_high"] and d["significant"] is False
  one = stats.paired_difference([2.0], [1.0])
  assert one == dict(mean=1.0, std=0.0, n=1, ci_low=None, ci_high=None, significant=False)
  same = stats.paired_difference([1.0, 2.0], [0.5, 1.5])  # constant difference: zero width
  assert same["ci_low"] == same["ci_high"] == 0.5 and same["significant"] is True
  with pytest.raises(ValueError, match="same seeds"):
    stats.paired_difference([1.0, 2.0], [1.0])


def test_verdict_sentences():
  a, b = [30.1, 30.5, 29.9], [30.6, 30.8, 30.4]
  want = "linear beats uniform by 0.43 perplexity (95 % CI 0.15 to 0.72, 3 seeds): significant."
  assert stats.verdict("linear", "uniform", stats.paired_difference(a, b)) == want
  # The winner comes first whichever order the settings were given in.
  assert stats.verdict("uniform", "linear", stats.paired_difference(b, a)) == want
  # Higher is better (accuracy): a's larger values win.
  s = stats.verdict("x", "y", stats.paired_difference([0.6, 0.7], [0.5, 0.65]), metric="accuracy",
                    lower_is_better=False)
  assert s.startswith("x beats y by 0.07 accuracy (95 % CI") and s.endswith("not significant.")
  assert stats.verdict("a", "b", stats.paired_difference([1.0], [1.5])) == \
      "a beats b by 0.50 perplexity (1 seed, no interval): not significant."
  assert stats.verdict("a", "b", stats.paired_difference([1.0, 2.0], [1.0, 2.0])).startswith(
      "a and b tie on perplexity")
  # Small differences keep two significant digits rather than rounding to 0.00.
  s = stats.verdict("a", "b", stats.paired_difference([1.001, 1.002, 1.0], [1.0, 1.0, 1.004]),
                    metric="loss")
  assert s == "a beats b by 0.0003 loss (95 % CI -0.0077 to 0.0083, 3 seeds): not significant."
