"""How much to prune where: layer blocks and per-block / per-layer sparsity ratios.

Pure numbers (numpy, no JAX): the allocation reads the `prune.*` config keys and the
parameter counts of the targeted matrices, and returns one ratio per layer and per block.
Every generated allocation is solved so the parameter-weighted mean ratio equals
`prune.target` (README, "What is computed, exactly"); the weights are the blocks' (or layers')
parameter counts, so blocks of unequal size (12 layers in 5 blocks) still average to S.

    layer_sizes ─┐
    prune.* ─────┼─> allocate() ─> (ratios_per_layer [n_layer], ratios_per_block [n_blocks])
    owl outliers ┘
"""
from typing import Optional, Sequence

import numpy as np

from blockprune_jax.errors import UserError

MAX_RATIO = 0.99  # generated ratios stay in [0, MAX_RATIO]: a fully pruned block kills the model
# Measured on the model (plan.Plan solves them from calibration losses, then uses them as
# explicit block ratios): sensitivity (per-block loss curves) and search (a budgeted search).
MEASURED = ("sensitivity", "search")
ALLOCATIONS = ("explicit", "layer", "uniform", "linear", "exponential", "owl") + MEASURED


def block_layers(n_layer: int, n_blocks: int) -> list[list[int]]:
  """Contiguous layer blocks exactly as numpy.array_split splits range(n_layer).

  12 layers, 3 blocks -> [[0..3], [4..7], [8..11]]; 12 layers, 5 blocks -> 3,3,2,2,2 layers.
  """
  if not 1 <= n_blocks <= n_layer:
    raise UserError(f"prune.blocks={n_blocks} must be between 1 and the model's n_layer="
                    f"{n_layer}: set --config.prune.blocks to a value in that range")
  return [[int(i) for i in part] for part in np.array_split(np.arange(n_layer), n_blocks)]


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
  """sum(w * v) / sum(w): the overall sparsity of parts of sizes `weights`."""
  w = np.asarray(weights, np.float64)
  return float(np.dot(np.asarray(values, np.float64), w) / w.sum())


# --- the allocation rules --------------------------------------------------------


def solve_linear_ratios(target: float, spread: float, weights: Sequence[float]) -> list[float]:
  """Evenly spaced ratios, last minus first = `spread`, weighted mean = `target`.

  r_b = a + spread * b / (B - 1) with a solved in closed form; then clipped to
  [0, MAX_RATIO] with the excess shifted onto the unclipped blocks (spacing kept among them).
  """
  n = len(weights)
  steps = np.arange(n) / max(n - 1, 1)
  offsets = spread * steps
  ratios = target - weighted_mean(offsets, weights) + offsets
  return redistribute_clipped(ratios, weights, target, mode="shift")


def solve_exponential_ratios(target: float, growth: float, weights: Sequence[float]) -> list[float]:
  """Ratios with a constant factor `growth` between consecutive blocks, weighted mean = `target`.

  r_b = a * growth**b with a solved in closed form; then clipped to [0, MAX_RATIO] with the
  excess rescaled onto the unclipped blocks (constant factor kept among them).
  """
  if growth <= 0:
    raise UserError(f"prune.growth={growth} must be > 0 (the factor between consecutive blocks)")
  shape = growth ** np.arange(len(weights), dtype=np.float64)
  ratios = shape * target / weighted_mean(shape, weights)
  return redistribute_clipped(ratios, weights, target, mode="scale")


def owl_ratios(target: float, lam: float, outlier_ratios: Sequence[float],
               weights: Sequence[float]) -> list[float]:
  """OWL (Yin et al. 2023): layers with more outliers get lower sparsity, within target ± lam.

  OWL min-max normalises the outlier ratios D to [0, 2λ] and sets sparsity
  S - (D_norm - mean(D_norm)). That can leave the band [S-λ, S+λ] when D is skewed (one outlier
  layer), so we centre D_norm on its parameter-weighted mean and scale the deviations by the
  largest factor <= 2λ that keeps every layer inside the band: identical to OWL when OWL's
  ratios already fit, and the mean stays exactly S either way.
  """
  d = np.asarray(outlier_ratios, np.float64)
  if d.max() - d.min() < 1e-12:  # no layer stands out: nothing to redistribute
    return redistribute_clipped(np.full(len(d), target), weights, target, mode="shift")
  dev = (d - d.min()) / (d.max() - d.min())
  dev = dev - weighted_mean(dev, weights)
  scale = min(2 * lam, lam / np.abs(dev).max())
  return redistribute_clipped(target - scale * dev, weights, target, mode="shift")


def outlier_ratios(layer_scores, threshold: float) -> list[float]:
  """OWL's layerwise outlier ratio D_l: per layer, the fraction of its targeted weights whose
  Wanda score |W_ij| * ||X_i|| exceeds `threshold` (M) times the layer's mean score.

  layer_scores: [n_layer] lists of score arrays (pruning.layer_scores('wanda', ...)).
  """
  out = []
  for scores in layer_scores:
    scores = [np.asarray(s, np.float64) for s in scores]
    total = sum(s.size for s in scores)
    mean = sum(s.sum() for s in scores) / total
    out.append(float(sum(int((s > threshold * mean).sum()) for s in scores) / total))
  return out


def redistribute_clipped(ratios: Sequence[float], weights: Sequence[float], target: float, *,
                         mode: str, lo: float = 0.0, hi: float = MAX_RATIO) -> list[float]:
  """Clips ratios to [lo, hi] and moves the clipped-off sparsity onto the other blocks.

  The shape is kept: `shift` adds one constant c to every ratio (linear spacing survives),
  `scale` multiplies every ratio by one factor c (a constant growth factor survives); c is the
  value for which the weighted mean of clip(shape ∘ c) is `target`. That mean is monotone in c,
  so bisection finds it; if no c reaches the target the allocation is unreachable.
  """
  r0 = np.asarray(ratios, np.float64)
  w = np.asarray(weights, np.float64)
  if np.all((r0 >= lo) & (r0 <= hi)):
    return [float(x) for x in r0]

  if mode == "shift":
    apply = lambda c: np.clip(r0 + c, lo, hi)
    c_lo, c_hi = lo - r0.max() - 1.0, hi - r0.min() + 1.0
  elif mode == "scale":
    apply = lambda c: np.clip(r0 * c, lo, hi)
    positive = r0[r0 > 0]
    c_lo, c_hi = 0.0, (hi / positive.min() + 1.0) if positive.size else 1.0
  else:
    raise ValueError(f"mode={mode!r}: expected shift or scale")
  mean = lambda c: weighted_mean(apply(c), w)
  if not mean(c_lo) - 1e-9 <= target <= mean(c_hi) + 1e-9:
    raise UserError(f"prune.target={target} is unreachable with every ratio in [{lo}, {hi}] "
                    f"for this allocation shape ({mode} of {np.round(r0, 4).tolist()}): "
                    "lower prune.target or change prune.spread / prune.growth")
  for _ in range(200):  # bisection; the mean is continuous and non-decreasing in c
    mid = 0.5 * (c_lo + c_hi)
    if mean(mid) < target:
      c_lo = mid
    else:
      c_hi = mid
  return [float(x) for x in apply(0.5 * (c_lo + c_hi))]


# --- from the config ---------------------------------------------------------------


def allocate(prune, layer_sizes: Sequence[int],
             outlier_ratios: Optional[Sequence[float]] = None) -> tuple[list[float], list[float]]:
  """Per-layer and per-block sparsity ratios from the `prune.*` config keys.

  Args:
    prune: the config's prune section (allocation, blocks, ratios, target, spread, growth,
      direction, owl_lambda).
    layer_sizes: [n_layer] parameter count of the targeted matrices of each layer (the weights
      of every mean).
    outlier_ratios: [n_layer] OWL outlier fractions (see outlier_ratios); owl only.
  Returns:
    (ratios_per_layer [n_layer], ratios_per_block [n_blocks]); a block's ratio is the weighted
    mean of its layers' (equal to each of them unless the allocation is per layer).
  """
  n_layer = len(layer_sizes)
  blocks = block_layers(n_layer, int(prune.blocks))
  block_sizes = [sum(layer_sizes[i] for i in b) for b in blocks]
  kind = prune.allocation
  if kind not in ALLOCATIONS:
    raise UserError(f"prune.allocation={kind!r}: expected one of {', '.join(ALLOCATIONS)}")
  if kind in MEASURED:
    raise ValueError(f"allocation {kind} is measured on the model: plan.Plan solves it")

  if kind in ("explicit", "layer"):
    per_layer = kind == "layer"
    want = n_layer if per_layer else len(blocks)
    ratios = _checked_ratios(prune.ratios, want, "layer" if per_layer else "block")
    if per_layer:
      return ratios, _block_means(ratios, layer_sizes, blocks)
    return expand_to_layers(ratios, blocks), ratios

  target = float(prune.target)
  if not 0.0 <= target <= MAX_RATIO:
    raise UserError(f"prune.target={target} is unreachable: a generated allocation needs a "
                    f"target in [0, {MAX_RATIO}]")
  if kind == "owl":
    if outlier_ratios is None:
      raise ValueError("allocation owl needs outlier_ratios (allocation.outlier_ratios)")
    ratios = owl_ratios(target, float(prune.owl_lambda), outlier_ratios, layer_sizes)
    return ratios, _block_means(ratios, layer_sizes, blocks)

  direction = prune.direction
  if direction not in ("increasing", "decreasing"):
    raise UserError(f"prune.direction={direction!r}: expected increasing or decreasing")
  # Solve front-to-back on the weights in the order the ratios grow, then put them back.
  weights = block_sizes if direction == "increasing" else block_sizes[::-1]
  if kind == "uniform":
    ratios = [target] * len(blocks)
  elif kind == "linear":
    ratios = solve_linear_ratios(target, float(prune.spread), weights)
  else:
    ratios = solve_exponential_ratios(target, float(prune.growth), weights)
  if direction == "decreasing":
    ratios = ratios[::-1]
  return expand_to_layers(ratios, blocks), ratios


def _checked_ratios(ratios, want: int, per: str) -> list[float]:
  ratios = [float(r) for r in (ratios or ())]
  if len(ratios) != want:
    raise UserError(f"prune.ratios has {len(ratios)} values; allocation "
                    f"{'layer' if per == 'layer' else 'explicit'} expects {want} (one per {per}): "
                    f"set --config.prune.ratios to a tuple of {want} ratios")
  for r in ratios:
    if not 0.0 <= r < 1.0:
      raise UserError(f"prune.ratios contains {r}: every ratio must be in [0, 1)")
  return ratios


def expand_to_layers(block_ratios, blocks) -> list[float]:
  """Per-block ratios -> per-layer ratios (every layer of a block gets the block's ratio)."""
  return [float(block_ratios[b]) for b, layers in enumerate(blocks) for _ in layers]


def _block_means(layer_ratios, layer_sizes, blocks) -> list[float]:
  return [weighted_mean([layer_ratios[i] for i in b], [layer_sizes[i] for i in b]) for b in blocks]
