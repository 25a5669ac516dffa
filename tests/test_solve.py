"""Per-block ratios from sensitivity curves and from a budgeted search (blockprune_jax.prune.solve)."""
import numpy as np
import pytest

from blockprune_jax.prune import solve
from blockprune_jax.prune.allocation import MAX_RATIO, weighted_mean
from blockprune_jax.errors import UserError

GRID = (0.2, 0.4, 0.6, 0.8, 0.9)  # configs/base.py prune.sensitivity_ratios


def assert_on_budget(ratios, weights, target, tol=1e-6):
  assert len(ratios) == len(weights)
  assert abs(weighted_mean(ratios, weights) - target) < tol
  assert all(0.0 <= r <= MAX_RATIO for r in ratios)


def random_curves(rng, n_blocks, grid, convex):
  """[B, R] loss increases: convex ones from sorted positive slopes, others from noisy ones."""
  dx = np.diff(np.concatenate([[0.0], grid]))
  slopes = rng.exponential(1.0, (n_blocks, len(grid))) * rng.uniform(0.1, 10, (n_blocks, 1))
  if convex:
    slopes = np.sort(slopes, axis=1)
  else:
    slopes += rng.normal(0, 1.0, slopes.shape)  # dips and non-monotone noise
  return np.cumsum(slopes * dx, axis=1)


# --- solve_sensitivity ------------------------------------------------------------


@pytest.mark.parametrize("convex", [True, False])
def test_solve_meets_the_budget_on_random_problems(convex):
  rng = np.random.RandomState(1)
  for _ in range(150):
    n_blocks = rng.randint(1, 13)
    grid = np.sort(rng.choice(np.arange(1, 99) / 100, rng.randint(1, 8), replace=False))
    if rng.rand() < 0.3:
      grid = np.concatenate([[0.0], grid])
    losses = random_curves(rng, n_blocks, grid, convex)
    weights = rng.randint(1, 10_000, n_blocks)
    target = rng.uniform(0.1, 0.9)
    ratios = solve.solve_sensitivity(grid, losses, weights, target)
    assert_on_budget(ratios, weights, target, tol=1e-9)


def test_solve_edges_of_the_budget():
  losses = random_curves(np.random.RandomState(2), 4, GRID, convex=True)
  assert solve.solve_sensitivity(GRID, losses, [1, 2, 3, 4], 0.0) == [0.0] * 4
  assert solve.solve_sensitivity(GRID, losses, [1, 2, 3, 4], MAX_RATIO) == \
      pytest.approx([MAX_RATIO] * 4, abs=1e-12)


def test_solve_is_optimal_against_budget_neutral_transfers():
  """KKT check on convex curves: moving budget between any two blocks never lowers the loss."""
  rng = np.random.RandomState(3)
  for _ in range(20):
    n_blocks = rng.randint(2, 7)
    losses = random_curves(rng, n_blocks, GRID, convex=True)
    weights = rng.randint(100, 1000, n_blocks).astype(float)
    target = rng.uniform(0.1, 0.9)
    r = np.array(solve.solve_sensitivity(GRID, losses, weights, target))
    best = solve.predicted_loss(GRID, losses, r)
    for a in range(n_blocks):
      for b in range(n_blocks):
        if a == b:
          continue
        for eps in (1e-3, 1e-2, 0.1):  # block a gets eps more ratio, b gives the same budget
          moved = r.copy()
          moved[a] += eps
          moved[b] -= eps * weights[a] / weights[b]
          if moved[a] <= MAX_RATIO and moved[b] >= 0:
            assert solve.predicted_loss(GRID, losses, moved) >= best - 1e-9


def test_solve_matches_the_quadratic_lagrangian_optimum():
  """f_b(r) = a_b r^2: the optimum is r_b = min(hi, c w_b / a_b) with c setting the budget."""
  step = 0.01
  grid = np.arange(1, 100) * step  # 0.01 .. 0.99; 0 is implied
  a = np.array([1.0, 2.0, 5.0, 0.5, 10.0])
  w = np.array([3.0, 1.0, 2.0, 1.0, 4.0])
  losses = a[:, None] * grid[None, :] ** 2
  for target in (0.2, 0.4, 0.6):
    lo_c, hi_c = 0.0, 100.0
    for _ in range(200):
      c = 0.5 * (lo_c + hi_c)
      if weighted_mean(np.minimum(MAX_RATIO, c * w / a), w) < target:
        lo_c = c
      else:
        hi_c = c
    want = np.minimum(MAX_RATIO, c * w / a)
    got = solve.solve_sensitivity(grid, losses, w, target)
    assert_on_budget(got, w, target, tol=1e-9)
    # The piecewise-linear optimum sits at grid knots except one block: within a grid step.
    np.testing.assert_allclose(got, want, atol=step)
    if target == 0.6:
      assert want[3] == MAX_RATIO  # the clipped case is covered


def test_solve_matches_a_hand_derived_piecewise_linear_optimum():
  # Block 0: slopes 0.5 then 2.0 (and 2.0 extrapolated to 0.99); weight 1: costs 0.5, 2.0.
  # Block 1: slope 2.0 throughout (extrapolated); weight 2: cost 1.0 per budget unit.
  grid = [0.0, 0.4, 0.8]
  losses = [[0.0, 0.2, 1.0], [0.0, 0.8, 1.6]]
  w = [1, 2]
  # target 0.5 -> budget 1.5: block 0 to 0.4 (0.4 units), then block 1 takes 1.1 -> 0.55.
  assert solve.solve_sensitivity(grid, losses, w, 0.5) == pytest.approx([0.4, 0.55], abs=1e-9)
  # target 0.8 -> budget 2.4: block 0 to 0.4, block 1 to 0.99 (1.98), block 0 gets 0.02 more.
  assert solve.solve_sensitivity(grid, losses, w, 0.8) == pytest.approx([0.42, 0.99], abs=1e-9)
  # Without its cheap first segment, block 0 costs 2.0 everywhere: block 1 fills first.
  losses = [[0.0, 0.8, 1.6], [0.0, 0.8, 1.6]]
  assert solve.solve_sensitivity(grid, losses, w, 0.5) == pytest.approx([0.0, 0.75], abs=1e-9)


def test_solve_uses_the_hull_of_a_non_convex_curve():
  # Block 0 measured (0.3, 0.5) lies above the chord (0, 0)-(0.6, 0.6): its hull costs 1 per
  # unit up to 0.6, cheaper than block 1's 1.5. Greedy on the raw segments (1.67, then 0.33)
  # would stop block 0 at 0.3 and give block 1 the rest: predicted 0.95 instead of 0.6.
  grid = [0.3, 0.6, 0.9]
  block1 = [0.45, 0.9, 1.35]
  losses = [[0.5, 0.6, 2.0], block1]
  got = solve.solve_sensitivity(grid, losses, [1, 1], 0.3)
  assert got == pytest.approx([0.6, 0.0], abs=1e-9)
  assert solve.predicted_loss(grid, losses, got) == pytest.approx(0.6)
  # A non-monotone dip is a hull knot: (0, 0)-(0.6, 0.3) at slope 0.5 skips (0.3, 0.5).
  losses = [[0.5, 0.3, 2.0], block1]
  assert solve.solve_sensitivity(grid, losses, [1, 1], 0.3) == pytest.approx([0.6, 0.0], abs=1e-9)


def test_identical_blocks_get_identical_ratios():
  losses = np.tile([[0.1, 0.2, 0.3, 0.4, 0.45]], (4, 1))  # linear (ties on every segment)
  ratios = solve.solve_sensitivity(GRID, losses, [5, 5, 5, 5], 0.37)
  assert ratios == pytest.approx([0.37] * 4, abs=1e-12)


def test_curve_adds_zero_and_extrapolates_without_decreasing():
  x, y = solve.sensitivity_curve([0.5, 0.8], [1.0, 2.5])
  np.testing.assert_allclose(x, [0.0, 0.5, 0.8, MAX_RATIO])
  np.testing.assert_allclose(y, [0.0, 1.0, 2.5, 2.5 + 5.0 * (MAX_RATIO - 0.8)])
  _, y = solve.sensitivity_curve([0.5, 0.8], [1.0, 0.7])  # falling last segment: held flat
  assert y[-1] == pytest.approx(0.7)
  x, y = solve.sensitivity_curve([0.5, 0.995], [1.0, 2.0])  # knots past hi are cut at hi
  assert x[-1] == MAX_RATIO and y[-1] == pytest.approx(np.interp(MAX_RATIO, [0.5, 0.995], [1, 2]))


@pytest.mark.parametrize("target", [-0.1, 0.995, 1.0])
def test_solve_rejects_unreachable_targets(target):
  with pytest.raises(UserError, match="prune.target"):
    solve.solve_sensitivity(GRID, np.ones((2, 5)), [1, 1], target)


@pytest.mark.parametrize("grid", [(0.4, 0.2), (0.2, 0.2), (0.5, 1.0), (0.0,), ()])
def test_solve_rejects_bad_grids(grid):
  with pytest.raises(UserError, match="prune.sensitivity_ratios"):
    solve.solve_sensitivity(grid, np.ones((2, len(grid))), [1, 1], 0.5)


def test_project_to_budget():
  w = [1.0, 2.0, 3.0]
  r = solve.project_to_budget([0.1, 0.2, 0.3], w, 0.5)  # in bounds: one shift, spacing kept
  assert_on_budget(r, w, 0.5, tol=1e-12)
  np.testing.assert_allclose(np.diff(r), [0.1, 0.1])
  r = solve.project_to_budget([-3.0, 0.5, 4.0], w, 0.6)  # clipped at both ends
  assert_on_budget(r, w, 0.6, tol=1e-9)
  assert r[0] == 0.0 and r[2] == MAX_RATIO


# --- search_allocation ------------------------------------------------------------


class Counted:
  """Wraps a score function and counts its calls."""

  def __init__(self, fn):
    self.fn, self.calls = fn, 0

  def __call__(self, ratios):
    self.calls += 1
    return self.fn(np.asarray(ratios))


W = np.array([2.0, 1.0, 1.0, 3.0, 1.0, 2.0])
TARGET = 0.5
OPTIMUM = np.array(solve.project_to_budget([0.3, 0.45, 0.6, 0.45, 0.75, 0.6], W, TARGET))
STARTS = {
    "uniform": [TARGET] * 6,
    "linear": solve.project_to_budget(np.linspace(0.4, 0.6, 6), W, TARGET),
    "reverse": solve.project_to_budget(np.linspace(0.7, 0.3, 6), W, TARGET),
}


def quadratic(r):
  return float(np.sum(W * (r - OPTIMUM) ** 2) + 1.0)


def test_search_improves_on_the_best_start_within_its_budget():
  score = Counted(quadratic)
  out = solve.search_allocation(score, STARTS, W, TARGET, evals=60, seed=0)
  assert score.calls == len(out["history"]) <= 60
  assert_on_budget(out["ratios"], W, TARGET, tol=1e-9)
  for h in out["history"]:
    assert_on_budget(h["ratios"], W, TARGET, tol=1e-9)
  best_start = min(out["start_scores"].values())
  assert out["start_name"] == min(out["start_scores"], key=out["start_scores"].get)
  # The optimum is none of the starts; the search closes most of the gap to it.
  assert out["score"] - 1.0 < 0.3 * (best_start - 1.0)
  assert out["score"] == pytest.approx(quadratic(np.array(out["ratios"])))
  assert out["score"] == min(h["score"] for h in out["history"])


def test_search_is_deterministic_given_the_seed():
  runs = [solve.search_allocation(quadratic, STARTS, W, TARGET, evals=20, seed=s)
          for s in (7, 7, 8)]
  assert runs[0]["ratios"] == runs[1]["ratios"]
  assert runs[0]["ratios"] != runs[2]["ratios"]


def test_search_never_returns_worse_than_its_best_start():
  # A score that punishes any move away from the best start (and is noisy elsewhere).
  best = np.array(STARTS["linear"])
  rng = np.random.RandomState(0)
  score = Counted(lambda r: 0.0 if np.allclose(r, best) else 1.0 + rng.rand())
  out = solve.search_allocation(score, STARTS, W, TARGET, evals=25, seed=1)
  assert score.calls == 25
  assert out["score"] == 0.0 and out["start_name"] == "linear"
  assert out["ratios"] == pytest.approx(list(best), abs=1e-12)


def test_search_scores_duplicate_starts_once_and_treats_nan_as_worst():
  starts = dict(STARTS, twin=list(STARTS["uniform"]))
  score = Counted(lambda r: float("nan") if abs(r[0] - 0.5) < 1e-12 else quadratic(r))
  out = solve.search_allocation(score, starts, W, TARGET, evals=4, seed=0)
  # The twin reuses uniform's score, which leaves one call of the 4 for the search.
  assert score.calls == 4
  assert [h["name"] for h in out["history"]] == ["uniform", "linear", "reverse", "search"]
  assert out["start_scores"]["uniform"] == out["start_scores"]["twin"] == float("inf")
  assert out["start_name"] != "uniform" and np.isfinite(out["score"])


def test_search_projects_starts_and_handles_a_fixed_point():
  out = solve.search_allocation(quadratic, {"off": [0.9] * 6}, W, TARGET, evals=5)
  assert_on_budget(out["ratios"], W, TARGET, tol=1e-9)
  score = Counted(lambda r: float(r[0]))
  out = solve.search_allocation(score, {"u": [0.3]}, [10], 0.3, evals=50)
  assert score.calls == 1 and out["ratios"] == pytest.approx([0.3])  # one block: no freedom


def test_search_needs_an_eval_per_start():
  with pytest.raises(UserError, match="prune.search_evals"):
    solve.search_allocation(quadratic, STARTS, W, TARGET, evals=2)


# --- solve_curves and sensitivity_allocation -------------------------------------------


def test_solve_curves_respects_each_blocks_own_range_and_the_budget():
  w = np.array([1.0, 2.0, 1.0])
  knots = [(np.array([0.5, 0.6, 0.7]), np.array([0.0, 1.0, 3.0])),   # steep: stays low
           (np.array([0.6, 0.7, 0.8]), np.array([0.0, 0.1, 0.2])),   # cheap: filled first
           (np.array([0.4, 0.9]), np.array([0.0, 0.5]))]
  r = solve.solve_curves(knots, w, 0.7)
  assert_on_budget(r, w, 0.7, tol=1e-9)
  for ri, (x, _) in zip(r, knots):
    assert x[0] - 1e-12 <= ri <= x[-1] + 1e-12
  # Block 1 (0.5 loss per budget unit) fills to its top before block 2 (1.0) moves; block 0
  # (cost 10) stays at its start.
  assert r[1] == pytest.approx(0.8) and r[0] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="above the budget"):
    solve.solve_curves(knots, w, 0.3)


def interacting_loss(r):
  """Block 0 hurts alone; blocks 0 and 2 hurt together (a first-and-last interaction that
  curves of one block at a time never see)."""
  r = np.asarray(r)
  return float(np.sum([3.0, 1.0, 1.0] * r ** 4) + 4.0 * r[0] * r[2] + 1.0)


def test_refinement_finds_the_interacting_optimum_the_alone_curves_miss():
  w, target = np.ones(3), 0.6
  fine = [(a, b, 3 * target - a - b) for a in np.arange(0, 1, 0.005)
          for b in np.arange(0, 1, 0.005) if 0 <= 3 * target - a - b <= MAX_RATIO]
  optimum = min(interacting_loss(r) for r in fine)
  score = Counted(interacting_loss)
  one = solve.sensitivity_allocation(score, GRID, w, target, rounds=1)
  assert score.calls == one["evals"] == 1 + 3 * len(GRID) + 1
  score.calls = 0
  out = solve.sensitivity_allocation(score, GRID, w, target, rounds=12)
  assert score.calls == out["evals"] <= 1 + 3 * len(GRID) + 1 + 11 * (2 * 3 + 1)
  assert_on_budget(out["ratios"], w, target, tol=1e-9)
  for h in out["rounds"]:
    if h["ratios"] is not None:
      assert_on_budget(h["ratios"], w, target, tol=1e-9)
  assert one["loss"] - optimum > 0.05  # the alone-curves' solve is clearly off
  assert out["loss"] - optimum < 0.05 * (one["loss"] - optimum)
  assert out["loss"] == pytest.approx(interacting_loss(out["ratios"]))
  assert out["loss_increase"] == one["loss_increase"]  # round 1 is recorded as measured


def test_refinement_starts_from_the_best_start_and_never_ends_worse():
  w, target = np.ones(3), 0.6
  good = solve.sensitivity_allocation(interacting_loss, GRID, w, target, rounds=12)["ratios"]
  out = solve.sensitivity_allocation(interacting_loss, GRID, w, target, rounds=1,
                                  starts={"good": good})
  assert out["start_losses"]["good"] < out["start_losses"]["solve"]
  assert out["ratios"] == pytest.approx(good)
  more = solve.sensitivity_allocation(interacting_loss, GRID, w, target, rounds=6,
                                   starts={"good": good})
  assert more["loss"] <= out["loss"]
