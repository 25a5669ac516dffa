"""Gradual magnitude pruning (Zhu & Gupta 2017): the cubic sparsity schedule, in steps.

    s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3   on [t0, t1]

masks recomputed every `every` steps from t0 to t1 (t1 included), kept after t1; the masks
themselves come from pruning.compute_masks(previous=...), so they only grow.
"""
from typing import Sequence

from blockprune_jax.prune import allocation
from blockprune_jax.errors import UserError


def gmp_sparsity(step: int, *, s_init: float, s_final: float, start: int, end: int) -> float:
  """The cubic schedule above: s_init before `start`, s_final from `end` on."""
  if step < start:
    return float(s_init)
  if step >= end:
    return float(s_final)
  frac = (step - start) / (end - start)
  return float(s_final + (s_init - s_final) * (1.0 - frac) ** 3)


def gmp_update_steps(start: int, end: int, every: int) -> list[int]:
  """Mask-update steps t0, t0 + every, ... up to and including t1 (t1 always included)."""
  if every < 1:
    raise UserError(f"prune.every resolves to {every} steps; it must be at least 1 step")
  steps = list(range(int(start), int(end) + 1, int(every)))
  if not steps or steps[-1] != end:
    steps.append(int(end))
  return steps


def is_gmp_update_step(step: int, *, start: int, end: int, every: int) -> bool:
  """Whether `step` is one of gmp_update_steps."""
  return start <= step <= end and ((step - start) % every == 0 or step == end)


def scale_ratios(ratios_per_layer: Sequence[float], sparsity: float,
                 layer_sizes: Sequence[int]) -> list[float]:
  """The allocation's shape at overall sparsity s: ratios * s / S, S their weighted mean."""
  s_final = allocation.weighted_mean(ratios_per_layer, layer_sizes)
  if s_final <= 0:
    return [0.0] * len(ratios_per_layer)
  return [float(r) * sparsity / s_final for r in ratios_per_layer]


def schedule_steps(prune, total: int) -> tuple[int, int, int]:
  """(start, end, every) in steps from prune.start / end / every: fractions of the run if <= 1,
  else step counts."""
  conv = lambda x: int(round(x * total)) if x <= 1 else int(x)
  start, end, every = conv(prune.start), conv(prune.end), max(1, conv(prune.every))
  if not 0 <= start <= end:
    raise UserError(f"prune.start={prune.start} must not come after prune.end={prune.end}")
  # Masks are updated before steps 0 .. total-1: an end at (or past) the last step means the
  # final sparsity is reached before the last update, as the schedule promises.
  end = min(end, total - 1)
  return min(start, end), end, every
