"""Layer blocks and per-block ratios: the contract in the README's "What is computed, exactly"."""
import numpy as np
import pytest

from blockprune_jax.prune import allocation
from blockprune_jax.errors import UserError
from configs import base


def prune_cfg(**overrides):
  p = base.get_config().prune
  for k, v in overrides.items():
    setattr(p, k, v)
  return p


def block_weights(n_layer, n_blocks, layer_size=100):
  return [layer_size * len(b) for b in allocation.block_layers(n_layer, n_blocks)]


def test_block_layers_is_array_split():
  assert allocation.block_layers(12, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
  assert allocation.block_layers(6, 3) == [[0, 1], [2, 3], [4, 5]]
  for n_layer, n_blocks in [(12, 5), (24, 7), (2, 2), (5, 1)]:
    want = [list(a) for a in np.array_split(np.arange(n_layer), n_blocks)]
    assert allocation.block_layers(n_layer, n_blocks) == want


@pytest.mark.parametrize("n_blocks", [0, 13])
def test_block_layers_rejects_bad_counts(n_blocks):
  with pytest.raises(UserError, match="prune.blocks"):
    allocation.block_layers(12, n_blocks)


@pytest.mark.parametrize("kind", ["uniform", "linear", "exponential"])
@pytest.mark.parametrize("n_blocks", [3, 5])
@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_generated_allocations_hit_the_target(kind, n_blocks, target):
  sizes = [100] * 12
  per_layer, per_block = allocation.allocate(
      prune_cfg(allocation=kind, blocks=n_blocks, target=target, spread=0.2, growth=1.5), sizes)
  assert len(per_layer) == 12 and len(per_block) == n_blocks
  assert abs(allocation.weighted_mean(per_layer, sizes) - target) < 1e-3
  assert abs(allocation.weighted_mean(per_block, block_weights(12, n_blocks)) - target) < 1e-3
  assert all(0.0 <= r <= allocation.MAX_RATIO for r in per_layer)
  for b, layers in enumerate(allocation.block_layers(12, n_blocks)):
    assert all(per_layer[i] == per_block[b] for i in layers)


@pytest.mark.parametrize("n_blocks", [3, 5])
def test_linear_is_evenly_spaced_with_the_spread(n_blocks):
  _, r = allocation.allocate(prune_cfg(allocation="linear", blocks=n_blocks, target=0.5,
                                       spread=0.3), [10] * 12)
  np.testing.assert_allclose(np.diff(r), 0.3 / (n_blocks - 1), atol=1e-9)
  assert r[-1] - r[0] == pytest.approx(0.3)


@pytest.mark.parametrize("n_blocks", [3, 5])
def test_exponential_has_a_constant_factor(n_blocks):
  _, r = allocation.allocate(prune_cfg(allocation="exponential", blocks=n_blocks, target=0.3,
                                       growth=1.4), [10] * 12)
  assert max(r) < allocation.MAX_RATIO  # unclipped: the factor holds everywhere
  np.testing.assert_allclose(np.array(r[1:]) / np.array(r[:-1]), 1.4, rtol=1e-9)


def test_hpml_geometric_example():
  # HPML's [.1, .18, .32] has mean 0.2 and factor 1.8 (rounded to 2 decimals).
  _, r = allocation.allocate(prune_cfg(allocation="exponential", blocks=3, target=0.2,
                                       growth=1.8), [1] * 12)
  np.testing.assert_allclose(r, [0.1, 0.18, 0.32], atol=0.005)


@pytest.mark.parametrize("kind", ["linear", "exponential"])
@pytest.mark.parametrize("n_blocks", [3, 5])
def test_decreasing_reverses(kind, n_blocks):
  sizes = [7] * 12
  up = allocation.allocate(prune_cfg(allocation=kind, blocks=n_blocks, target=0.4), sizes)[1]
  down = allocation.allocate(prune_cfg(allocation=kind, blocks=n_blocks, target=0.4,
                                       direction="decreasing"), sizes)[1]
  assert all(a > b for a, b in zip(down, down[1:]))
  # Unequal blocks (5 of 12: 3,3,2,2,2 layers) move the weights, so the mirror image is solved
  # on mirrored weights; with equal blocks it is exactly the reversed list.
  if 12 % n_blocks == 0:
    np.testing.assert_allclose(down, up[::-1], atol=1e-12)
  per_layer = allocation.allocate(prune_cfg(allocation=kind, blocks=n_blocks, target=0.4,
                                            direction="decreasing"), sizes)[0]
  assert abs(allocation.weighted_mean(per_layer, sizes) - 0.4) < 1e-3


def test_clipping_redistributes_and_stays_below_the_cap():
  sizes = [100] * 12
  per_layer, r = allocation.allocate(
      prune_cfg(allocation="exponential", blocks=3, target=0.9, growth=3.0), sizes)
  assert max(r) == pytest.approx(allocation.MAX_RATIO)
  assert all(x <= allocation.MAX_RATIO + 1e-12 for x in r)
  assert abs(allocation.weighted_mean(per_layer, sizes) - 0.9) < 1e-3
  assert r[0] < r[1] <= r[2]  # [0.72, 0.99, 0.99]: two blocks at the cap
  # 5 blocks: the top ones clip, the rest keep the constant factor among themselves.
  _, r = allocation.allocate(
      prune_cfg(allocation="exponential", blocks=5, target=0.6, growth=2.0), sizes)
  assert abs(allocation.weighted_mean(r, block_weights(12, 5)) - 0.6) < 1e-3
  free = np.array([x for x in r if x < allocation.MAX_RATIO])
  assert len(free) >= 2
  np.testing.assert_allclose(free[1:] / free[:-1], 2.0, rtol=1e-9)
  # Linear: the low end clips at 0 and the rest stay evenly spaced.
  _, r = allocation.allocate(prune_cfg(allocation="linear", blocks=5, target=0.05, spread=0.4),
                             sizes)
  assert r[0] == 0.0 and min(r) >= 0.0
  assert abs(allocation.weighted_mean(r, block_weights(12, 5)) - 0.05) < 1e-3
  free = [x for x in r if x > 0]
  np.testing.assert_allclose(np.diff(free), 0.1, atol=1e-9)


def test_redistribute_clipped_unreachable():
  with pytest.raises(UserError, match="prune.target"):
    # Scaling [0, 0.5] never gives block 0 any sparsity, so a mean of 0.8 is out of reach.
    allocation.redistribute_clipped([0.0, 1.6], [1, 1], 0.8, mode="scale")


@pytest.mark.parametrize("target", [-0.1, 0.995, 1.2])
def test_unreachable_target(target):
  with pytest.raises(UserError, match="prune.target"):
    allocation.allocate(prune_cfg(allocation="linear", target=target), [1] * 12)


def test_explicit_and_layer_ratios():
  sizes = [2] * 6 + [1] * 6
  per_layer, per_block = allocation.allocate(
      prune_cfg(allocation="explicit", blocks=3, ratios=(0.1, 0.3, 0.5)), sizes)
  assert per_layer == [0.1] * 4 + [0.3] * 4 + [0.5] * 4 and per_block == [0.1, 0.3, 0.5]
  ratios = tuple(i / 20 for i in range(12))
  per_layer, per_block = allocation.allocate(
      prune_cfg(allocation="layer", blocks=3, ratios=ratios), sizes)
  assert per_layer == list(ratios)
  assert per_block[0] == pytest.approx(np.mean(ratios[:4]))
  assert per_block[1] == pytest.approx((2 * (ratios[4] + ratios[5]) + ratios[6] + ratios[7]) / 6)


def test_explicit_errors_name_the_key():
  with pytest.raises(UserError, match=r"prune.ratios has 2 values.*expects 3"):
    allocation.allocate(prune_cfg(allocation="explicit", blocks=3, ratios=(0.1, 0.2)), [1] * 12)
  with pytest.raises(UserError, match=r"prune.ratios.*expects 12"):
    allocation.allocate(prune_cfg(allocation="layer", blocks=3, ratios=(0.1, 0.2, 0.3)), [1] * 12)
  with pytest.raises(UserError, match=r"prune.ratios contains 1.0"):
    allocation.allocate(prune_cfg(allocation="explicit", blocks=3, ratios=(0.1, 1.0, 0.2)),
                        [1] * 12)
  with pytest.raises(UserError, match=r"prune.ratios contains -0.1"):
    allocation.allocate(prune_cfg(allocation="explicit", blocks=3, ratios=(0.1, -0.1, 0.2)),
                        [1] * 12)
  with pytest.raises(UserError, match="prune.allocation"):
    allocation.allocate(prune_cfg(allocation="cubic"), [1] * 12)
  with pytest.raises(UserError, match="prune.direction"):
    allocation.allocate(prune_cfg(allocation="linear", direction="up"), [1] * 12)


@pytest.mark.parametrize("outliers", [[0.01, 0.05, 0.02, 0.03, 0.04, 0.02],
                                      [0.01, 0.01, 0.01, 0.01, 0.01, 0.3]])  # skewed: one layer
def test_owl_band_mean_and_order(outliers):
  sizes = [3, 3, 2, 2, 1, 1]
  per_layer, per_block = allocation.allocate(
      prune_cfg(allocation="owl", blocks=3, target=0.5, owl_lambda=0.08), sizes, outliers)
  assert all(0.5 - 0.08 - 1e-9 <= r <= 0.5 + 0.08 + 1e-9 for r in per_layer)
  assert abs(allocation.weighted_mean(per_layer, sizes) - 0.5) < 1e-3
  assert int(np.argmin(per_layer)) == int(np.argmax(outliers))
  assert np.all(np.diff(np.array(per_layer)[np.argsort(outliers)]) <= 1e-12)  # monotone
  assert len(per_block) == 3


def test_owl_matches_the_paper_when_it_fits():
  # Symmetric outliers: OWL's own rule S - (D_norm - mean) with D_norm in [0, 2λ].
  d = np.array([0.0, 0.5, 1.0])
  lam, s = 0.1, 0.6
  paper = s - ((d - d.min()) / (d.max() - d.min()) * 2 * lam - np.mean(
      (d - d.min()) / (d.max() - d.min()) * 2 * lam))
  np.testing.assert_allclose(allocation.owl_ratios(s, lam, d, [1, 1, 1]), paper, atol=1e-12)
