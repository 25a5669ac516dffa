"""How much to prune where: the allocation registry, from `prune.allocation` to ratios.

An allocation is registered by name with one signature, `ratios(Inputs) -> Ratios` (one ratio
per layer and per block); `Allocation` says what it needs beyond the config and the layer
sizes: OWL's outlier ratios, or a calibration loss to measure on the model (sensitivity,
search). Every generated allocation hits `prune.target` as a parameter-weighted mean (solve.py),
so blocks of unequal size still average to it. The config's allowed `prune.allocation` values
are this registry's names.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from blockprune_jax.errors import UserError
from blockprune_jax.prune import solve
from blockprune_jax.prune.solve import MAX_RATIO, redistribute_clipped, weighted_mean


def block_layers(n_layer: int, n_blocks: int) -> list[list[int]]:
  """Contiguous layer blocks as numpy.array_split splits range(n_layer) (12 in 5: 3,3,2,2,2)."""
  if not 1 <= n_blocks <= n_layer:
    raise UserError(f"prune.blocks={n_blocks} must be between 1 and the model's n_layer="
                    f"{n_layer}: set --config.prune.blocks to a value in that range")
  return [[int(i) for i in part] for part in np.array_split(np.arange(n_layer), n_blocks)]


def expand_to_layers(block_ratios, blocks) -> list[float]:
  """Per-block ratios -> per-layer ratios (every layer of a block gets the block's ratio)."""
  return [float(block_ratios[b]) for b, layers in enumerate(blocks) for _ in layers]


class Ratios(NamedTuple):
  per_layer: list
  per_block: list
  measured: dict  # a measured allocation's results.json "pruning" entries


def _no_event(*args, **fields):
  del args, fields


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What an allocation may use."""
  p: Any  # the prune.* keys
  sizes: Sequence[int]  # [n_layer] targeted parameters of each layer: the weights of every mean
  outliers: Optional[Sequence[float]] = None  # OWL's per-layer outlier ratios
  loss: Optional[Callable] = None  # block ratios -> calibration loss (Allocation.measured)
  seed: int = 0
  event: Callable = _no_event  # the run's log.event, for what a measured allocation found

  @property
  def blocks(self) -> list[list[int]]:
    return block_layers(len(self.sizes), int(self.p.blocks))

  @property
  def block_sizes(self) -> list[int]:
    return [sum(self.sizes[l] for l in b) for b in self.blocks]

  def per_block(self, ratios, measured=None) -> Ratios:
    ratios = [float(r) for r in ratios]
    return Ratios(expand_to_layers(ratios, self.blocks), ratios, measured or {})

  def per_layer(self, ratios) -> Ratios:
    means = [weighted_mean([ratios[i] for i in b], [self.sizes[i] for i in b])
             for b in self.blocks]
    return Ratios(list(ratios), means, {})


@dataclasses.dataclass(frozen=True)
class Allocation:
  name: str
  ratios: Callable[[Inputs], Ratios]
  outliers: bool = False  # needs OWL's outlier ratios (calibration statistics)
  measured: bool = False  # scored on the model (Inputs.loss); a checkpoint keeps the result


ALLOCATIONS: dict[str, Allocation] = {}


def register(allocation: Allocation) -> Allocation:
  ALLOCATIONS[allocation.name] = allocation
  return allocation


def get(name: str) -> Allocation:
  if name not in ALLOCATIONS:
    raise UserError(f"prune.allocation={name!r}: expected one of {', '.join(ALLOCATIONS)}")
  return ALLOCATIONS[name]


def allocate(prune, layer_sizes: Sequence[int],
             outlier_ratios: Optional[Sequence[float]] = None) -> tuple[list[float], list[float]]:
  """(ratios_per_layer, ratios_per_block) of a generated or given allocation, from prune.*."""
  found = get(prune.allocation).ratios(Inputs(prune, layer_sizes, outlier_ratios))
  return found.per_layer, found.per_block


# --- given ratios ------------------------------------------------------------------------


def _given(inputs: Inputs, per: str) -> list[float]:
  want = len(inputs.sizes) if per == "layer" else len(inputs.blocks)
  ratios = [float(r) for r in (inputs.p.ratios or ())]
  if len(ratios) != want:
    raise UserError(f"prune.ratios has {len(ratios)} values; allocation "
                    f"{'layer' if per == 'layer' else 'explicit'} expects {want} (one per {per}): "
                    f"set --config.prune.ratios to a tuple of {want} ratios")
  for r in ratios:
    if not 0.0 <= r < 1.0:
      raise UserError(f"prune.ratios contains {r}: every ratio must be in [0, 1)")
  return ratios


def explicit(inputs: Inputs) -> Ratios:
  return inputs.per_block(_given(inputs, "block"))


def layer(inputs: Inputs) -> Ratios:
  return inputs.per_layer(_given(inputs, "layer"))


# --- generated from prune.target ---------------------------------------------------------


def _target(inputs: Inputs) -> float:
  target = float(inputs.p.target)
  if not 0.0 <= target <= MAX_RATIO:
    raise UserError(f"prune.target={target} is unreachable: a generated allocation needs a "
                    f"target in [0, {MAX_RATIO}]")
  return target


def _ramp(solve_shape: Callable[[Any, float, list], list[float]]) -> Callable[[Inputs], Ratios]:
  """An allocation whose ratios grow block to block (prune.direction=decreasing reverses them):
  solved front to back on the weights in the order the ratios grow."""
  def ratios(inputs: Inputs) -> Ratios:
    direction = inputs.p.direction
    if direction not in ("increasing", "decreasing"):
      raise UserError(f"prune.direction={direction!r}: expected increasing or decreasing")
    weights = inputs.block_sizes
    if direction == "decreasing":
      return inputs.per_block(solve_shape(inputs.p, _target(inputs), weights[::-1])[::-1])
    return inputs.per_block(solve_shape(inputs.p, _target(inputs), weights))
  return ratios


def solve_linear_ratios(target: float, spread: float, weights: Sequence[float]) -> list[float]:
  """Evenly spaced ratios, last minus first = `spread`, weighted mean = `target` (the spacing
  kept among the unclipped blocks)."""
  offsets = spread * (np.arange(len(weights)) / max(len(weights) - 1, 1))
  ratios = target - weighted_mean(offsets, weights) + offsets
  return redistribute_clipped(ratios, weights, target, mode="shift")


def solve_exponential_ratios(target: float, growth: float, weights: Sequence[float]) -> list[float]:
  """A constant factor `growth` between consecutive blocks, weighted mean = `target`."""
  if growth <= 0:
    raise UserError(f"prune.growth={growth} must be > 0 (the factor between consecutive blocks)")
  shape = growth ** np.arange(len(weights), dtype=np.float64)
  ratios = shape * target / weighted_mean(shape, weights)
  return redistribute_clipped(ratios, weights, target, mode="scale")


def owl_ratios(target: float, lam: float, outlier_ratios: Sequence[float],
               weights: Sequence[float]) -> list[float]:
  """OWL (Yin et al. 2023): layers with more outliers get lower sparsity, within target ± lam.

  OWL's min-max normalisation can leave the band [S-λ, S+λ] when one layer stands out, so the
  deviations are centred on their weighted mean and scaled by the largest factor <= 2λ that
  keeps every layer inside it: OWL itself when its ratios fit, and the mean stays exactly S.
  """
  d = np.asarray(outlier_ratios, np.float64)
  if d.max() - d.min() < 1e-12:  # no layer stands out: nothing to redistribute
    return redistribute_clipped(np.full(len(d), target), weights, target, mode="shift")
  dev = (d - d.min()) / (d.max() - d.min())
  dev = dev - weighted_mean(dev, weights)
  scale = min(2 * lam, lam / np.abs(dev).max())
  return redistribute_clipped(target - scale * dev, weights, target, mode="shift")


def outlier_ratios(layer_scores, threshold: float) -> list[float]:
  """OWL's D_l: per layer, the fraction of its targeted weights whose Wanda score exceeds
  `threshold` times the layer's mean score (layer_scores from pruning.layer_scores)."""
  out = []
  for scores in layer_scores:
    scores = [np.asarray(s, np.float64) for s in scores]
    total = sum(s.size for s in scores)
    mean = sum(s.sum() for s in scores) / total
    out.append(float(sum(int((s > threshold * mean).sum()) for s in scores) / total))
  return out


def owl(inputs: Inputs) -> Ratios:
  if inputs.outliers is None:
    raise ValueError("allocation owl needs outlier_ratios (allocation.outlier_ratios)")
  p = inputs.p
  return inputs.per_layer(owl_ratios(_target(inputs), float(p.owl_lambda), inputs.outliers,
                                     inputs.sizes))


# --- measured on the model ---------------------------------------------------------------


def sensitivity(inputs: Inputs) -> Ratios:
  """The calibration-loss increase of each block pruned alone, solved at the budget and refined
  (solve.sensitivity_allocation)."""
  p = inputs.p
  if inputs.loss is None:
    raise ValueError(f"allocation {p.allocation} is measured on the model: plan.compute solves it")
  found = solve.sensitivity_allocation(inputs.loss, p.sensitivity_ratios, inputs.block_sizes,
                                       float(p.target), int(p.sensitivity_rounds))
  inputs.event("sensitivity", f"sensitivity: loss {found['loss']:.4f} after {found['evals']} "
               f"calibration evaluations; ratios {[round(r, 4) for r in found['ratios']]}",
               evals=found["evals"], loss=found["loss"])
  return inputs.per_block(found["ratios"], {"sensitivity": found})


def search(inputs: Inputs) -> Ratios:
  """A budgeted search (solve.search_allocation) from sensitivity's answer and the ramps."""
  sens = sensitivity(inputs)
  starts = {"sensitivity": sens.per_block}
  for name in ("uniform", "linear", "exponential", "owl"):
    starts[name] = ALLOCATIONS[name].ratios(inputs).per_block
  found = solve.search_allocation(inputs.loss, starts, inputs.block_sizes, float(inputs.p.target),
                                  int(inputs.p.search_evals), seed=inputs.seed)
  ratios = [float(r) for r in found["ratios"]]
  best = {"evals": len(found["history"]), "score": found["score"],
          "base_loss": sens.measured["sensitivity"]["base_loss"],
          "best_start": found["start_name"], "start_scores": found["start_scores"],
          "ratios": ratios}
  inputs.event("search", f"search: loss {found['score']:.4f} (best start {found['start_name']} "
               f"{min(found['start_scores'].values()):.4f}); ratios "
               f"{[round(r, 4) for r in ratios]}", **best)
  return inputs.per_block(ratios, {**sens.measured, "search": best})


register(Allocation("explicit", explicit))
register(Allocation("layer", layer))
register(Allocation("uniform", _ramp(lambda p, target, weights: [target] * len(weights))))
register(Allocation("linear", _ramp(
    lambda p, target, weights: solve_linear_ratios(target, float(p.spread), weights))))
register(Allocation("exponential", _ramp(
    lambda p, target, weights: solve_exponential_ratios(target, float(p.growth), weights))))
register(Allocation("owl", owl, outliers=True))
register(Allocation("sensitivity", sensitivity, measured=True))
register(Allocation("search", search, outliers=True, measured=True))
MEASURED = tuple(name for name, a in ALLOCATIONS.items() if a.measured)  # validate.py, pipeline.py
