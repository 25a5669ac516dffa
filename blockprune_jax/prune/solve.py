"""Per-block ratios at an exact parameter budget: the numbers behind every allocation.

Pure numpy. Every function returns ratios r_b in [0, hi] whose parameter-weighted mean
sum(w_b r_b) / sum(w_b) equals `target`, so allocations are compared at exactly the same
sparsity (README, "What is computed, exactly").

    sensitivity curves [B, R] ─> solve_sensitivity() ─> ratios [B]   (one exact solve)
    loss_fn ───────────────────> sensitivity_allocation() ─> ratios [B]   (probes, refined)
    score_fn + starts ─────────> search_allocation() ─> ratios [B]   (`evals` score calls)
"""
from typing import Callable, Mapping, Sequence

import numpy as np

from blockprune_jax.errors import UserError

MAX_RATIO = 0.99  # generated ratios stay in [0, MAX_RATIO]: a fully pruned block kills the model


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
  """sum(w * v) / sum(w): the overall sparsity of parts of sizes `weights`."""
  w = np.asarray(weights, np.float64)
  return float(np.dot(np.asarray(values, np.float64), w) / w.sum())


def redistribute_clipped(ratios: Sequence[float], weights: Sequence[float], target: float, *,
                         mode: str, lo: float = 0.0, hi: float = MAX_RATIO) -> list[float]:
  """Clips ratios to [lo, hi] and moves the clipped-off sparsity onto the other blocks.

  The shape is kept: `shift` adds one constant c to every ratio (linear spacing survives),
  `scale` multiplies every ratio by one c (a constant growth factor survives); the mean is
  monotone in c, so bisection finds the c whose clipped mean is `target`.
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
  for _ in range(200):
    mid = 0.5 * (c_lo + c_hi)
    if mean(mid) < target:
      c_lo = mid
    else:
      c_hi = mid
  return [float(x) for x in apply(0.5 * (c_lo + c_hi))]


def _check_target(target: float, hi: float) -> float:
  target = float(target)
  if not 0.0 <= target <= hi:
    raise UserError(f"prune.target={target} is unreachable: every block ratio must stay in "
                    f"[0, {hi}], so set --config.prune.target to a value in that range")
  return target


def _check_weights(weights: Sequence[float], n: int) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  if w.shape != (n,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
    raise ValueError(f"weights must be {n} positive parameter counts, got {weights!r}")
  return w


# --- projection onto the budget ----------------------------------------------------


def project_to_budget(ratios: Sequence[float], weights: Sequence[float], target: float,
                      hi: float = MAX_RATIO) -> list[float]:
  """The nearest ratios (w-weighted norm) with weighted mean `target`, each in [0, hi].

  The minimiser is r_b = clip(x_b + c, 0, hi) for one constant c. We shift to the exact mean
  first because redistribute_clipped returns in-bounds ratios untouched, whatever their mean.
  """
  target = _check_target(target, hi)
  x = np.asarray(ratios, np.float64)
  w = _check_weights(weights, x.size)
  shifted = x + (target - weighted_mean(x, w))
  return redistribute_clipped(shifted, w, target, mode="shift", lo=0.0, hi=hi)


# --- exact solve on measured sensitivity curves -------------------------------------


def sensitivity_curve(grid: Sequence[float], losses_b: Sequence[float],
                      hi: float = MAX_RATIO) -> tuple[np.ndarray, np.ndarray]:
  """The knots (x [K], y [K]), x[-1] == hi, of one block's predicted loss increase f_b.

  f_b interpolates the measurements (grid [R], losses_b [R]) with f_b(0) = 0 added. Past the
  last measured ratio it keeps the last slope, clamped at >= 0: a loss that falls as more is
  pruned would only be noise, and flat is the most conservative guess without a measurement.
  """
  x = np.asarray(grid, np.float64)
  y = np.asarray(losses_b, np.float64)
  if x[0] > 0:
    x, y = np.concatenate([[0.0], x]), np.concatenate([[0.0], y])
  if x[-1] < hi:
    slope = max((y[-1] - y[-2]) / (x[-1] - x[-2]), 0.0) if x.size > 1 else 0.0
    return np.append(x, hi), np.append(y, y[-1] + slope * (hi - x[-1]))
  keep = x < hi
  return np.append(x[keep], hi), np.append(y[keep], np.interp(hi, x, y))


def predicted_loss(grid: Sequence[float], losses: Sequence[Sequence[float]],
                   ratios: Sequence[float], hi: float = MAX_RATIO) -> float:
  """sum_b f_b(r_b): the objective solve_sensitivity minimises (the raw curves, not hulls)."""
  total = 0.0
  for losses_b, r in zip(np.asarray(losses, np.float64), ratios):
    x, y = sensitivity_curve(grid, losses_b, hi)
    total += float(np.interp(r, x, y))
  return total


def _lower_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Knots of the lower convex hull of (x [K], y [K]), x ascending (Andrew's monotone chain)."""
  hx, hy = [x[0]], [y[0]]
  for px, py in zip(x[1:], y[1:]):
    while len(hx) >= 2 and ((hx[-1] - hx[-2]) * (py - hy[-2])
                            - (hy[-1] - hy[-2]) * (px - hx[-2])) <= 0:
      hx.pop()
      hy.pop()
    hx.append(px)
    hy.append(py)
  return np.array(hx), np.array(hy)


def _check_grid(grid, losses, hi: float) -> tuple[np.ndarray, np.ndarray]:
  g = np.asarray(grid, np.float64).ravel()
  if g.size == 0 or not np.all(np.isfinite(g)) or g[0] < 0 or g[-1] >= 1.0 \
      or np.any(np.diff(g) <= 0):
    raise UserError(f"prune.sensitivity_ratios={tuple(grid)} must be strictly ascending ratios "
                    "in [0, 1): set --config.prune.sensitivity_ratios to e.g. (0.2, 0.4, 0.6, 0.8)")
  if g[-1] <= 0:
    raise UserError("prune.sensitivity_ratios needs at least one ratio > 0 to measure a "
                    "block's sensitivity: add e.g. 0.5 to --config.prune.sensitivity_ratios")
  curves = np.asarray(losses, np.float64)
  if curves.ndim != 2 or curves.shape[1] != g.size:
    raise ValueError(f"losses must be [blocks, {g.size}] (one per grid ratio), got shape "
                     f"{curves.shape}")
  if not np.all(np.isfinite(curves)):
    raise ValueError(f"losses must be finite, got {curves.tolist()}")
  return g, curves


def solve_sensitivity(grid: Sequence[float], losses: Sequence[Sequence[float]],
                      weights: Sequence[float], target: float,
                      hi: float = MAX_RATIO) -> list[float]:
  """Ratios minimising the predicted loss sum_b f_b(r_b) at the exact budget.

  losses [B, R]: the loss increase with block b alone pruned at grid[j]. For convex curves this
  is a fractional knapsack over the curves' segments, filled cheapest loss per budget unit
  first. Measured curves are nearly convex, their dips noise, so each is replaced by its lower
  convex hull: exactly optimal for the hulls. Tied segments fill in proportion, so identical
  blocks get identical ratios.
  """
  target = _check_target(target, hi)
  g, curves = _check_grid(grid, losses, hi)
  w = _check_weights(weights, curves.shape[0])
  return solve_curves([sensitivity_curve(g, losses_b, hi) for losses_b in curves], w, target)


def solve_curves(knots: Sequence[tuple], weights: Sequence[float], target: float) -> list[float]:
  """solve_sensitivity's knapsack on each block's own curve knots[b] = (x [K], y [K]), block b's
  ratio confined to [x[0], x[-1]]; every block starts at its lowest knot."""
  w = np.asarray(weights, np.float64)
  blocks, starts, lengths, costs = [], [], [], []
  for b, (x, y) in enumerate(knots):
    hx, hy = _lower_hull(np.asarray(x, np.float64), np.asarray(y, np.float64))
    dx = np.diff(hx)
    blocks += [b] * dx.size
    starts += list(hx[:-1])
    lengths += list(dx)
    costs += list(np.diff(hy) / dx / w[b])
  blocks, starts, lengths, costs = map(np.asarray, (blocks, starts, lengths, costs))

  # Sort by cost, then block and position so a block's own segments stay in order on ties.
  order = np.lexsort((starts, blocks, costs))
  ratios = np.array([float(x[0]) for x, _ in knots])
  remaining = target * w.sum() - float(np.dot(w, ratios))  # budget units still to place
  if remaining < -1e-9 * w.sum():
    raise ValueError(f"the curves start above the budget: {ratios.tolist()} vs target {target}")
  tol = 1e-12 * max(1.0, float(np.abs(costs).max())) if costs.size else 0.0
  i = 0
  while i < order.size and remaining > 0:
    j = i + 1  # the group [i, j): segments of (numerically) equal cost
    while j < order.size and costs[order[j]] - costs[order[i]] <= tol:
      j += 1
    group = order[i:j]
    capacity = float(np.sum(w[blocks[group]] * lengths[group]))
    frac = min(1.0, remaining / capacity)
    for k in group:
      ratios[blocks[k]] += frac * lengths[k]
    remaining -= frac * capacity
    i = j
  return [float(r) for r in np.clip(ratios, [x[0] for x, _ in knots], [x[-1] for x, _ in knots])]


# --- allocations measured on the model ----------------------------------------------


def sensitivity_allocation(loss_fn: Callable[[list[float]], float], grid: Sequence[float],
                        weights: Sequence[float], target: float, rounds: int,
                        starts: Mapping[str, Sequence[float]] | None = None,
                        hi: float = MAX_RATIO, step: float = 0.1) -> dict:
  """Per-block ratios from loss curves measured on the model (loss_fn: block ratios -> loss).

  Round 1 probes each block alone at every grid ratio and solves those curves. Alone-curves
  miss how blocks interact (at 80 % every other block is pruned too), so that solve is only a
  first guess: each later round is a trust-region step, block b probed at r_b +- step with the
  others at r, the local curves solved, the candidate kept if its real loss is lower, else the
  step halves. `starts` (name -> ratios) are scored once and the best of them and the solve is
  refined, so the result is never worse than any of them by loss_fn.

  Returns dict(ratios, loss, base_loss, grid, loss_increase [B, R] (round 1), start_losses,
  rounds [dict(ratios, loss, step, accepted) per later round], evals).
  """
  target = _check_target(target, hi)
  g = np.asarray(sorted(float(r) for r in grid), np.float64)
  _check_grid(g, np.zeros((1, g.size)), hi)
  w = _check_weights(weights, len(weights))
  calls = [0]

  def loss(r):
    calls[0] += 1
    s = float(loss_fn([float(x) for x in r]))
    return s if np.isfinite(s) else float("inf")

  base = loss([0.0] * w.size)
  curves = [[loss([r if c == b else 0.0 for c in range(w.size)]) - base for r in g]
            for b in range(w.size)]
  solved = solve_sensitivity(g, curves, w, target, hi)
  start_losses = {"solve": loss(solved)}
  best, best_loss = solved, start_losses["solve"]
  for name, r in (starts or {}).items():
    r = project_to_budget(r, w, target, hi)
    start_losses[name] = loss(r)
    if start_losses[name] < best_loss:
      best, best_loss = r, start_losses[name]
  history = []
  for _ in range(int(rounds) - 1):
    if step < 1e-3 or w.size < 2:
      break
    cand = _trust_region_step(loss, best, best_loss, w, target, step, hi)
    cand_loss = loss(cand) if cand is not None else None  # None: the local curves balance
    accepted = cand_loss is not None and cand_loss < best_loss
    history.append(dict(ratios=cand, loss=cand_loss, step=step, accepted=accepted))
    if accepted:
      best, best_loss = cand, cand_loss
    else:
      step /= 2
  return dict(ratios=[float(r) for r in best], loss=best_loss, base_loss=base, grid=g.tolist(),
              loss_increase=curves, start_losses=start_losses, rounds=history, evals=calls[0])


def _trust_region_step(loss, ratios, current, w, target, step, hi):
  """The solve of the local curves around `ratios` (each block probed at +- step with the
  others where they are), or None when it would not move."""
  knots = []
  for b, r in enumerate(ratios):
    x, y = [r], [0.0]
    for probe in (max(r - step, 0.0), min(r + step, hi)):
      if abs(probe - r) > 1e-12:
        moved = list(ratios)
        moved[b] = probe
        x.append(probe)
        y.append(loss(moved) - current)
    order = np.argsort(x)
    knots.append((np.asarray(x)[order], np.asarray(y)[order]))
  cand = solve_curves(knots, w, target)
  if np.max(np.abs(np.subtract(cand, ratios))) < 1e-9:
    return None
  return project_to_budget(cand, w, target, hi)


# --- derivative-free search at the budget ------------------------------------------


def search_allocation(score_fn: Callable[[list[float]], float],
                      starts: Mapping[str, Sequence[float]], weights: Sequence[float],
                      target: float, evals: int, seed: int = 0, hi: float = MAX_RATIO,
                      sigma0: float = 0.05) -> dict:
  """The lowest-scoring ratios on the budget found in at most `evals` score_fn calls.

  The starts (name -> ratios), projected onto the budget, are scored first (duplicates once);
  the rest run a (1+1) evolution strategy from the best: a Gaussian step in the budget's
  tangent plane, projected back, kept when strictly better. Rechenberg's 1/5 rule sets the step
  size: no tuning, and it suits the few dozen expensive calls (a calibration loss each) we can
  afford. The best point ever scored is returned, so never worse than the best start.

  Returns dict(ratios, score, start_name, start_scores {name: score},
  history [dict(name, ratios, score, sigma) per score_fn call]).
  """
  target = _check_target(target, hi)
  if not starts:
    raise ValueError("search_allocation needs at least one start")
  if int(evals) < len(starts):
    raise UserError(f"prune.search_evals={evals} is fewer than the {len(starts)} starting "
                    f"allocations ({', '.join(starts)}), which are all scored first: set "
                    f"--config.prune.search_evals to at least {len(starts)}")
  n = len(next(iter(starts.values())))
  w = _check_weights(weights, n)
  history = []

  def score(r, name, sigma=None):
    s = float(score_fn(list(r)))
    s = s if np.isfinite(s) else float("inf")  # a diverged model loses to every finite score
    history.append(dict(name=name, ratios=list(r), score=s, sigma=sigma))
    return s

  start_scores, best_name, best, best_score = {}, None, None, float("inf")
  scored = []  # (ratios, score) of the starts already called
  for name, r in starts.items():
    if len(r) != n:
      raise ValueError(f"start {name!r} has {len(r)} ratios, expected {n}")
    r = project_to_budget(r, w, target, hi)
    same = [s for q, s in scored if np.array_equal(q, r)]
    s = same[0] if same else score(r, name)
    scored.append((r, s))
    start_scores[name] = s
    if best is None or s < best_score:
      best_name, best, best_score = name, r, s

  rng = np.random.default_rng(seed)
  sigma = float(sigma0)
  # One block, or a target at 0 or hi, leaves a single feasible point: nothing to search.
  if n > 1 and 0.0 < target < hi:
    while len(history) < int(evals):
      z = rng.standard_normal(n)
      z -= weighted_mean(z, w)
      cand = project_to_budget(np.asarray(best) + sigma * z, w, target, hi)
      s = score(cand, "search", sigma)
      if s < best_score:
        best, best_score = cand, s
        sigma *= 1.5
      else:
        sigma *= 1.5 ** -0.25
      sigma = float(np.clip(sigma, 1e-4, hi))  # keep stepping, never past the whole box
  return dict(ratios=[float(r) for r in best], score=best_score, start_name=best_name,
              start_scores=start_scores, history=history)
