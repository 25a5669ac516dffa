"""Scores, masks, schedules and compaction, checked against torch.nn.utils.prune and NumPy."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockprune_jax.prune import allocation
from blockprune_jax.prune import calibration
from blockprune_jax.prune import gmp
from blockprune_jax import hf_io
from blockprune_jax import model as model_lib
from blockprune_jax.prune import pruning
from blockprune_jax import trees
from blockprune_jax.errors import UserError
from configs import base

TINY = model_lib.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=4, n_head=2,
                            dropout=0.0)


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(TINY, seed=0)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  """A tiny random HF GPT-2 saved to disk, and the same weights imported through hf_io."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100))
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  cfg = hf_io.load_config(str(path))
  return model, cfg, hf_io.load_params(str(path), cfg)


def first_layers(params, n):
  """The embeddings, ln_f and blocks 0..n-1: a smaller model without another (slow) init."""
  return {k: v for k, v in params.items() if not k.startswith("h_") or int(k[2:]) < n}


def zeros(x):
  return int(np.sum(np.asarray(x) == 0))


# --- agreement with torch.nn.utils.prune -------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.5, 0.9])
def test_magnitude_equals_torch_l1_unstructured(hf_model, ratio, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from torch.nn.utils import prune as torch_prune  # pylint: disable=import-outside-toplevel
  model, cfg, params = hf_model
  masks = pruning.compute_masks(params, [ratio] * cfg.n_layer, method="magnitude", targets="mlp")

  for l in range(cfg.n_layer):
    for name in ("c_fc", "c_proj"):
      module = getattr(model.transformer.h[l].mlp, name)
      ref = torch_prune.l1_unstructured(_copy_module(module), "weight", amount=ratio).weight_mask
      ours = np.asarray(masks[f"h_{l}"]["mlp"][name]["kernel"])
      assert ours.shape == tuple(ref.shape)  # Conv1D .weight is [in, out], like our kernel
      np.testing.assert_array_equal(ours, ref.numpy().astype(bool))
      assert zeros(ours) == round(ratio * ours.size)

  # The pruned model exports to HF and transformers sees exactly those zeros.
  pruned = pruning.apply_masks(params, masks)
  out = hf_io.export(jax.device_get(pruned), cfg, str(tmp_path / "export"))
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(out)
  for l in range(cfg.n_layer):
    for name in ("c_fc", "c_proj"):
      w = getattr(reloaded.transformer.h[l].mlp, name).weight.detach().numpy()
      np.testing.assert_array_equal(w == 0, ~np.asarray(masks[f"h_{l}"]["mlp"][name]["kernel"]))
    # Untargeted matrices are untouched.
    np.testing.assert_array_equal(reloaded.transformer.h[l].attn.c_attn.weight.detach().numpy(),
                                  model.transformer.h[l].attn.c_attn.weight.detach().numpy())
  assert isinstance(reloaded, torch.nn.Module)


def _copy_module(module):
  import copy  # pylint: disable=import-outside-toplevel
  return copy.deepcopy(module)


# --- exact counts ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("targets", ["mlp", "attn", "all"])
def test_matrix_scope_counts_are_exact(params, method, targets):
  ratios = [0.13, 0.5, 0.77, 0.333]
  masks = pruning.compute_masks(params, ratios, method=method, targets=targets,
                                key=jax.random.PRNGKey(1))
  for l in range(4):
    for name in pruning.target_names(targets):
      m = trees.get_path(masks, pruning.kernel_path(l, name))
      assert zeros(m) == round(ratios[l] * m.size)
  assert set(masks["h_0"]) == {n.split("/")[0] for n in pruning.target_names(targets)}


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_block_and_global_scopes_hit_their_counts(params, method):
  ratios = [0.2, 0.2, 0.6, 0.6]
  key = jax.random.PRNGKey(2)
  sizes = pruning.targeted_sizes(params, "all")
  masks = pruning.compute_masks(params, ratios, method=method, targets="all", scope="block",
                                blocks=2, key=key)
  for layers, r in [([0, 1], 0.2), ([2, 3], 0.6)]:
    got = sum(zeros(trees.get_path(masks, pruning.kernel_path(l, n)))
              for l in layers for n in pruning.MATRICES)
    assert got == round(r * sum(sizes[l] for l in layers))
  masks = pruning.compute_masks(params, ratios, method=method, targets="all", scope="global",
                                key=key)
  leaves = jax.tree.leaves(masks)
  assert (sum(int(jnp.sum(~m)) for m in leaves), sum(m.size for m in leaves)) == (
      round(0.4 * sum(sizes)), sum(sizes))
  if method == "magnitude":  # one threshold: every pruned |w| <= every kept |w|
    w = [np.abs(np.asarray(pruning.kernel(params, l, n)))
         for l in range(4) for n in pruning.MATRICES]
    m = [np.asarray(trees.get_path(masks, pruning.kernel_path(l, n)))
         for l in range(4) for n in pruning.MATRICES]
    assert max(x[~k].max() for x, k in zip(w, m)) <= min(x[k].min() for x, k in zip(w, m))


def test_block_scope_with_one_layer_per_block_ranks_the_layer_together(params):
  ratios = [0.1, 0.3, 0.5, 0.7]
  sizes = pruning.targeted_sizes(params, "all")
  masks = pruning.compute_masks(params, ratios, method="magnitude", targets="all", scope="block",
                                blocks=4)
  for l in range(4):
    ms = [trees.get_path(masks, pruning.kernel_path(l, n)) for n in pruning.MATRICES]
    assert sum(zeros(m) for m in ms) == round(ratios[l] * sizes[l])
  assert pruning.compute_masks(params, ratios, method="none") == {}


def test_ties_still_give_exact_counts():
  # Half the weights are exactly 0: a float threshold would over-prune; the sort does not.
  w = jnp.concatenate([jnp.zeros((8, 4)), jnp.ones((8, 4))], axis=0)
  p = {"h_0": {"mlp": {"c_fc": {"kernel": w}, "c_proj": {"kernel": w.T}}}}
  masks = pruning.compute_masks(p, [0.25], method="magnitude")
  assert zeros(masks["h_0"]["mlp"]["c_fc"]["kernel"]) == 16
  m = np.asarray(masks["h_0"]["mlp"]["c_fc"]["kernel"])
  assert not m[:4].any() and m[4:].all()  # among equal scores the lower index goes first
  masks = pruning.compute_masks(p, [0.75], method="magnitude")
  assert zeros(masks["h_0"]["mlp"]["c_proj"]["kernel"]) == 48


def test_smallest_k_marks_what_a_stable_sort_marks():
  """The counting search behind every exact-count mask vs NumPy's stable argsort: ties (the lower
  index first), -0 == +0, negatives, -inf (GMP's dead weights), k = 0 and k = n, per row."""
  rng = np.random.default_rng(0)
  rows = np.concatenate([
      rng.normal(size=(3, 50)),
      rng.integers(-2, 3, size=(3, 50)).astype(np.float64),  # many ties
      np.where(rng.random((2, 50)) < 0.3, -np.inf, rng.random((2, 50))),
      np.array([[0.0, -0.0] * 25]),
  ]).astype(np.float32)
  for k in (0, 1, 7, 25, 49, 50):
    got = np.asarray(jax.jit(pruning._smallest_k)(jnp.asarray(rows), np.int32(k)))  # pylint: disable=protected-access
    want = np.zeros(rows.shape, bool)
    for i, row in enumerate(rows):
      want[i, np.argsort(row, kind="stable")[:k]] = True
    np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


def test_user_errors(params):
  with pytest.raises(UserError, match="prune.targets"):
    pruning.target_names("ffn")
  with pytest.raises(UserError, match="prune.targets"):
    pruning.compute_masks(params, [0.5] * 4, method="neurons", targets="all")
  with pytest.raises(UserError, match="prune.scope"):
    pruning.compute_masks(params, [0.5] * 4, method="magnitude", scope="row")
  with pytest.raises(UserError, match="prune.method"):
    pruning.compute_masks(params, [0.5] * 4, method="l2")
  with pytest.raises(UserError, match="prune.blocks"):
    pruning.compute_masks(params, [0.5] * 4, method="magnitude", scope="block", blocks=5)


# --- wanda and owl -------------------------------------------------------------------------


def test_wanda_equals_numpy():
  rng = np.random.default_rng(0)
  d_in, d_out, r = 12, 5, 0.4
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  sumsq = rng.uniform(0.1, 5.0, size=d_in).astype(np.float32)
  p = {"h_0": {"mlp": {"c_fc": {"kernel": w}, "c_proj": {"kernel": w.T.copy()}}}}
  stats = {"h_0": {"mlp": {"c_fc_in": (sumsq / 2, sumsq / 2), "c_proj_in": (np.ones(d_out),)},
                   "attn": {"c_attn_in": (np.ones(1),), "c_proj_in": (np.ones(1),)}}}
  masks = pruning.compute_masks(p, [r], method="wanda", stats=stats)

  score = np.abs(w) * np.sqrt(sumsq)[:, None]
  k = round(r * d_in)
  want = np.ones_like(w, bool)
  for j in range(d_out):  # per output unit: zero the k lowest-scored inputs
    want[np.argsort(score[:, j], kind="stable")[:k], j] = False
  np.testing.assert_array_equal(np.asarray(masks["h_0"]["mlp"]["c_fc"]["kernel"]), want)
  assert zeros(masks["h_0"]["mlp"]["c_fc"]["kernel"]) == d_out * k
  with pytest.raises(UserError, match="prune.scope"):
    pruning.compute_masks(p, [r], method="wanda", stats=stats, scope="global")


def test_calibration_and_owl_plan(params):
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, TINY.vocab_size)
  stats = calibration.collect_stats(TINY, params, [ids, ids])
  single = calibration.collect_stats(TINY, params, [ids])
  np.testing.assert_allclose(stats["h_1"]["mlp"]["c_proj_in"],
                             2 * single["h_1"]["mlp"]["c_proj_in"], rtol=1e-6)
  assert stats["h_0"]["mlp"]["c_proj_in"].shape == (4 * TINY.n_embd,)

  # Make 5 % of layer 2's c_fc weights 50x the init scale: it has the most outliers.
  spiky = jax.tree.map(lambda x: x, params)
  fc = np.array(spiky["h_2"]["mlp"]["c_fc"]["kernel"])
  fc.flat[np.random.default_rng(0).choice(fc.size, fc.size // 20, replace=False)] = 1.0
  spiky["h_2"]["mlp"]["c_fc"]["kernel"] = jnp.asarray(fc)
  d = allocation.outlier_ratios(pruning.layer_scores("wanda", spiky, stats, "mlp"), 5.0)
  assert int(np.argmax(d)) == 2
  prune = base.get_config().prune
  prune.allocation, prune.blocks, prune.target, prune.owl_lambda = "owl", 2, 0.5, 0.1
  per_layer, _ = allocation.allocate(prune, pruning.targeted_sizes(spiky, "mlp"), d)
  plan = {"ratios_per_layer": per_layer, "block_layers": allocation.block_layers(4, 2)}
  r = plan["ratios_per_layer"]
  assert plan["block_layers"] == [[0, 1], [2, 3]]
  assert all(0.4 - 1e-9 <= x <= 0.6 + 1e-9 for x in r)
  assert abs(np.mean(r) - 0.5) < 1e-3
  assert int(np.argmin(r)) == 2
  assert np.all(np.diff(np.array(r)[np.argsort(d)]) <= 1e-12)  # more outliers, lower ratio


# --- structured neurons --------------------------------------------------------------------


def test_neurons_compact_gives_the_same_logits(params):
  cfg, params = dataclasses.replace(TINY, n_layer=3), first_layers(params, 3)
  ratios = [0.25, 0.0, 0.9]
  masks = pruning.compute_masks(params, ratios, method="neurons")
  f = 4 * TINY.n_embd
  for l, r in enumerate(ratios):
    units = np.asarray(masks[f"h_{l}"]["mlp"]["c_fc"]["bias"])
    assert int((~units).sum()) == round(r * f)
    mlp = masks[f"h_{l}"]["mlp"]
    np.testing.assert_array_equal(np.asarray(mlp["c_fc"]["kernel"]).all(0), units)  # columns
    np.testing.assert_array_equal(np.asarray(mlp["c_proj"]["kernel"]).all(1), units)  # rows
  # Scores: ||c_fc[:, k]|| * ||c_proj[k, :]||; the pruned units are the lowest-scored ones.
  mlp = params["h_0"]["mlp"]
  score = (np.linalg.norm(mlp["c_fc"]["kernel"], axis=0) *
           np.linalg.norm(mlp["c_proj"]["kernel"], axis=1))
  pruned = ~np.asarray(masks["h_0"]["mlp"]["c_fc"]["bias"])
  assert score[pruned].max() <= score[~pruned].min()

  small, widths = pruning.compact_mlp(params, masks)
  assert widths == tuple(f - round(r * f) for r in ratios)
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, TINY.vocab_size)
  dense = jax.jit(model_lib.GPT2(cfg).apply)({"params": pruning.apply_masks(params, masks)}, ids)
  compact_cfg = pruning.compacted_config(cfg, widths)
  logits = jax.jit(model_lib.GPT2(compact_cfg).apply)({"params": small}, ids)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(dense), atol=1e-5, rtol=1e-5)
  assert model_lib.count_params(small) < model_lib.count_params(params)


def test_neurons_keep_one_unit_when_all_pruned(params):
  cfg, p = dataclasses.replace(TINY, n_layer=1), first_layers(params, 1)
  masks = pruning.compute_masks(p, [1.0], method="neurons")
  small, widths = pruning.compact_mlp(p, masks)
  assert widths == (1,)
  ids = jnp.arange(8)[None]
  compact = model_lib.GPT2(pruning.compacted_config(cfg, widths)).apply({"params": small}, ids)
  dense = model_lib.GPT2(cfg).apply({"params": pruning.apply_masks(p, masks)}, ids)
  np.testing.assert_allclose(np.asarray(compact), np.asarray(dense), atol=1e-5)


# --- gradual magnitude pruning ------------------------------------------------------------


def test_gmp_schedule():
  kw = dict(s_init=0.0, s_final=0.9, start=100, end=300)
  assert gmp.gmp_sparsity(0, **kw) == 0.0
  assert gmp.gmp_sparsity(100, **kw) == 0.0
  assert gmp.gmp_sparsity(200, **kw) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
  assert gmp.gmp_sparsity(300, **kw) == pytest.approx(0.9)
  assert gmp.gmp_sparsity(10_000, **kw) == pytest.approx(0.9)
  assert gmp.gmp_sparsity(150, s_init=0.2, s_final=0.6, start=100, end=300) == pytest.approx(
      0.6 + (0.2 - 0.6) * 0.75 ** 3)
  assert gmp.gmp_update_steps(100, 300, 50) == [100, 150, 200, 250, 300]
  assert gmp.gmp_update_steps(0, 10, 4) == [0, 4, 8, 10]
  steps = [t for t in range(0, 400) if gmp.is_gmp_update_step(t, start=0, end=10, every=4)]
  assert steps == [0, 4, 8, 10]
  assert gmp.scale_ratios([0.2, 0.6], 0.2, [1, 1]) == pytest.approx([0.1, 0.3])
  assert gmp.scale_ratios([0.0, 0.0], 0.2, [1, 1]) == [0.0, 0.0]


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_gmp_masks_only_grow(params, method):
  final = [0.3, 0.5, 0.7, 0.9]
  sizes = pruning.targeted_sizes(params, "all")
  key = jax.random.PRNGKey(4)
  p, masks, last = params, None, None
  for i, t in enumerate(gmp.gmp_update_steps(0, 40, 10)):
    s = gmp.gmp_sparsity(t, s_init=0.0, s_final=0.6, start=0, end=40)
    ratios = gmp.scale_ratios(final, s, sizes)
    masks = pruning.compute_masks(p, ratios, method=method, targets="all", key=key,
                                  previous=masks)
    for l in range(4):
      for n in pruning.MATRICES:
        m = np.asarray(trees.get_path(masks, pruning.kernel_path(l, n)))
        assert zeros(m) == round(ratios[l] * m.size)
        if last is not None:
          assert not np.any(m & ~last[(l, n)])  # nothing revived
    last = {(l, n): np.asarray(trees.get_path(masks, pruning.kernel_path(l, n)))
            for l in range(4) for n in pruning.MATRICES}
    # Training moves the weights (and, without masking, would revive pruned ones).
    noise = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.PRNGKey(i), x.shape), p)
    p = jax.tree.map(jnp.add, pruning.apply_masks(p, masks), noise)


# --- applying and measuring ------------------------------------------------------------------


def test_apply_masks_under_jit(params):
  masks = pruning.compute_masks(params, [0.5] * 4, method="magnitude", targets="mlp")
  pruned = jax.jit(pruning.apply_masks)(params, masks)
  for l in range(4):
    assert zeros(pruned[f"h_{l}"]["mlp"]["c_fc"]["kernel"]) == round(0.5 * 32 * 128)
    np.testing.assert_array_equal(pruned[f"h_{l}"]["attn"]["c_attn"]["kernel"],
                                  params[f"h_{l}"]["attn"]["c_attn"]["kernel"])
    np.testing.assert_array_equal(pruned[f"h_{l}"]["mlp"]["c_fc"]["bias"],
                                  params[f"h_{l}"]["mlp"]["c_fc"]["bias"])
  np.testing.assert_array_equal(pruned["wte"]["embedding"], params["wte"]["embedding"])
  assert jax.tree.structure(pruned) == jax.tree.structure(params)
  grads = jax.tree.map(jnp.ones_like, params)
  masked = pruning.apply_masks(grads, masks)
  assert zeros(masked["h_0"]["mlp"]["c_proj"]["kernel"]) == round(0.5 * 128 * 32)
  # Float masks work too.
  fmasks = jax.tree.map(lambda m: m.astype(jnp.float32), masks)
  np.testing.assert_array_equal(pruning.apply_masks(params, fmasks)["h_1"]["mlp"]["c_fc"]["kernel"],
                                pruned["h_1"]["mlp"]["c_fc"]["kernel"])


def test_sparsity_on_a_known_tree():
  def layer(fc_zeros, attn_zeros):
    fc = np.ones((2, 8), np.float32)
    fc.flat[:fc_zeros] = 0.0
    attn = np.ones((2, 6), np.float32)
    attn.flat[:attn_zeros] = 0.0
    return {"attn": {"c_attn": {"kernel": attn}, "c_proj": {"kernel": np.ones((2, 2))}},
            "mlp": {"c_fc": {"kernel": fc}, "c_proj": {"kernel": np.zeros((8, 2))}}}
  p = {"h_0": layer(4, 0), "h_1": layer(8, 3), "h_2": layer(16, 12)}
  s = pruning.sparsity(p, 3, 2, "mlp")
  # mlp per layer: (fc zeros + 16) / 32
  assert s["per_layer"][0] == {"layer": 0, "block": 0, "c_fc": 0.25, "c_proj": 1.0,
                               "attn_c_attn": 0.0, "attn_c_proj": 0.0}
  assert s["per_layer"][2]["block"] == 1 and s["per_layer"][2]["attn_c_attn"] == 1.0
  assert s["per_block"] == [pytest.approx((4 + 8 + 32) / 64), pytest.approx(1.0)]
  assert s["overall"] == pytest.approx((4 + 8 + 16 + 48) / 96)
  assert pruning.sparsity(p, 3, 3, "attn")["overall"] == pytest.approx(15 / 48)
