"""SparseGPT against a plain NumPy float64 transcription of the reference `fasterprune`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockprune_jax.prune import sparsegpt

N_IN, N_OUT, N_TOKENS = 64, 48, 256


def reference_prune(w, h, ratio, blocksize, damp=0.01, nm=None):
  """IST-DASLab/sparsegpt `fasterprune` in float64 NumPy, one Python step per column.

  w [in, out] (our layout), h [in, in]. Same exact-count rule as sparsegpt.py: block i1..i2
  prunes round(r * out * i2) - round(r * out * i1) entries, ties to the lower flat index.
  Returns (w_new [in, out], keep [in, out]).
  """
  W = np.array(w, np.float64).T.copy()  # [out, in]
  H = np.array(h, np.float64).copy()
  rows, cols = W.shape
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H[np.diag_indices(cols)] += damp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor of H^-1
  pruned = np.zeros(W.shape, bool)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1 = W[:, i1:i2].copy()
    Q1, Err1 = np.zeros_like(W1), np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    mask1 = np.zeros(W1.shape, bool)
    if nm is None:
      k = round(ratio * (rows * i2)) - round(ratio * (rows * i1))
      tmp = W1 ** 2 / np.diag(Hinv1)[None, :] ** 2
      mask1.reshape(-1)[np.argsort(tmp.reshape(-1), kind="stable")[:k]] = True
    for i in range(i2 - i1):
      if nm is not None and i % nm[1] == 0:
        n, m = nm
        tmp = W1[:, i:i + m] ** 2 / np.diag(Hinv1)[i:i + m][None, :] ** 2
        smallest = np.argsort(tmp, axis=1, kind="stable")[:, :n]
        mask1[np.arange(rows)[:, None], i + smallest] = True
      w_col = W1[:, i].copy()
      q = w_col.copy()
      q[mask1[:, i]] = 0
      Q1[:, i] = q
      err = (w_col - q) / Hinv1[i, i]
      W1[:, i:] -= np.outer(err, Hinv1[i, i:])
      Err1[:, i] = err
    W[:, i1:i2] = Q1
    pruned[:, i1:i2] = mask1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  return W.T, ~pruned.T


@pytest.fixture(scope="module")
def layer():
  """(x [tokens, in] correlated inputs, w [in, out], h [in, in]) in float64."""
  rs = np.random.RandomState(0)
  mix = np.eye(N_IN) + 0.3 * rs.randn(N_IN, N_IN)  # correlated features: OBS updates matter
  x = rs.randn(N_TOKENS, N_IN) @ mix * rs.uniform(0.5, 2.0, N_IN)
  w = rs.randn(N_IN, N_OUT)
  h = 2.0 * x.T @ x / N_TOKENS
  return x, w, h


def run64(w, h, ratio, **kw):
  """sparsegpt_prune in float64 (x64 on for the call) -> NumPy arrays."""
  with jax.enable_x64(True):
    w_new, keep = sparsegpt.sparsegpt_prune(jnp.asarray(w, jnp.float64),
                                            jnp.asarray(h, jnp.float64), ratio, **kw)
    assert w_new.dtype == jnp.float64
    return np.asarray(w_new), np.asarray(keep)


@pytest.mark.parametrize("ratio,blocksize", [(0.3, 16), (0.5, 24)])  # 24: a shorter last block
def test_unstructured_matches_reference(layer, ratio, blocksize):
  _, w, h = layer
  ref_w, ref_keep = reference_prune(w, h, ratio, blocksize)
  w64, keep64 = run64(w, h, ratio, blocksize=blocksize)
  np.testing.assert_array_equal(keep64, ref_keep)
  np.testing.assert_allclose(w64, ref_w, atol=1e-4, rtol=0)
  # float32 (the default): same mask, weights within 1e-3 (float32 rounding compounds over
  # the 64 sequential column updates; observed max error ~5e-6 here).
  w32, keep32 = sparsegpt.sparsegpt_prune(jnp.asarray(w, jnp.float32),
                                          jnp.asarray(h, jnp.float32), ratio,
                                          blocksize=blocksize)
  assert w32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(keep32), ref_keep)
  np.testing.assert_allclose(np.asarray(w32), ref_w, atol=1e-3, rtol=0)
  # exact count: round(r * n) pruned overall, each block per the cumulative rule, all 0.0
  assert (~keep64).sum() == round(ratio * N_IN * N_OUT)
  counts = sparsegpt.block_prune_counts(ratio, N_OUT, N_IN, blocksize)
  per_block = [(~keep64[i:i + blocksize]).sum() for i in range(0, N_IN, blocksize)]
  np.testing.assert_array_equal(per_block, counts)
  assert np.all(w64[~keep64] == 0.0) and np.all(np.asarray(w32)[~keep64] == 0.0)
  assert np.all(w64[keep64] != 0.0)


@pytest.mark.parametrize("n,m,blocksize", [(2, 4, 16), (4, 8, 24)])
def test_nm_matches_reference(layer, n, m, blocksize):
  _, w, h = layer
  ref_w, ref_keep = reference_prune(w, h, None, blocksize, nm=(n, m))
  w64, keep64 = run64(w, h, n / m, blocksize=blocksize, nm=(n, m))
  np.testing.assert_array_equal(keep64, ref_keep)
  np.testing.assert_allclose(w64, ref_w, atol=1e-4, rtol=0)
  zeros_per_group = (~keep64).reshape(N_IN // m, m, N_OUT).sum(axis=1)
  assert np.all(zeros_per_group == n)
  assert np.all(w64[~keep64] == 0.0)
  # the N:M choice uses the updated weights: it is not simply nm_keep of the original scores
  first = np.asarray(sparsegpt.nm_keep(jnp.asarray(w ** 2), n, m))
  assert not np.array_equal(first, keep64)


def test_beats_magnitude_on_layer_output(layer):
  x, w, h = layer
  ratio = 0.5
  w_sgpt, _ = run64(w, h, ratio, blocksize=16)
  k = round(ratio * w.size)
  pruned = np.zeros(w.size, bool)
  pruned[np.argsort(np.abs(w).reshape(-1), kind="stable")[:k]] = True
  w_mag = np.where(pruned.reshape(w.shape), 0.0, w)
  err_sgpt = np.sum((x @ w - x @ w_sgpt) ** 2)
  err_mag = np.sum((x @ w - x @ w_mag) ** 2)
  assert err_sgpt < 0.7 * err_mag, (err_sgpt, err_mag)


def test_dead_inputs_no_nans(layer):
  x, w, _ = layer
  x = x.copy()
  x[:, [3, 40]] = 0.0  # two features never active in calibration
  h = sparsegpt.hessian(jnp.asarray(x, jnp.float32))
  w_new, keep = sparsegpt.sparsegpt_prune(jnp.asarray(w, jnp.float32), h, 0.5, blocksize=16)
  w_new = np.asarray(w_new)
  assert np.all(np.isfinite(w_new))
  assert np.all(w_new[[3, 40]] == 0.0)  # dead inputs' weights are dropped, as the reference
  assert (~np.asarray(keep)).sum() == round(0.5 * w.size)
  ref_w, ref_keep = reference_prune(w, np.asarray(h), 0.5, 16)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  np.testing.assert_allclose(w_new, ref_w, atol=1e-3, rtol=0)


def test_hessian_accumulates_batches(layer):
  x, _, h = layer
  x32 = jnp.asarray(x, jnp.float32).reshape(4, N_TOKENS // 4, N_IN)  # [batch, seq, in]
  parts = [sparsegpt.hessian_sum(x32[:1]), sparsegpt.hessian_sum(x32[1:])]
  total, count = parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
  assert count == N_TOKENS and total.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(sparsegpt.finalize_hessian(total, count)), h, rtol=1e-4,
                             atol=1e-4)


def test_nm_keep_counts_and_ties():
  rs = np.random.RandomState(1)
  scores = rs.randn(16, 5).astype(np.float32)
  keep = np.asarray(sparsegpt.nm_keep(jnp.asarray(scores), 2, 4))
  groups = scores.reshape(4, 4, 5)
  expect = np.ones_like(groups, bool)
  np.put_along_axis(expect, np.argsort(groups, axis=1, kind="stable")[:, :2], False, axis=1)
  np.testing.assert_array_equal(keep, expect.reshape(16, 5))
  # ties: the lower row goes first; all-equal groups prune their first n rows
  keep = np.asarray(jax.jit(sparsegpt.nm_keep, static_argnums=(1, 2))(jnp.ones((8, 3)), 3, 4))
  np.testing.assert_array_equal(keep[:, 0], [False] * 3 + [True] + [False] * 3 + [True])
  tied = jnp.asarray([[1.0], [0.0], [1.0], [0.0]])
  np.testing.assert_array_equal(np.asarray(sparsegpt.nm_keep(tied, 3, 4))[:, 0],
                                [False, False, True, False])


@pytest.mark.parametrize("n,m,shape", [(0, 4, (8, 2)), (4, 4, (8, 2)), (2, 4, (6, 2))])
def test_nm_keep_rejects_bad_nm(n, m, shape):
  with pytest.raises(ValueError):
    sparsegpt.nm_keep(jnp.zeros(shape), n, m)


def test_prune_rejects_bad_arguments(layer):
  _, w, h = layer
  w, h = jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32)
  with pytest.raises(ValueError, match="blocksize"):
    sparsegpt.sparsegpt_prune(w, h, None, blocksize=18, nm=(2, 4))
  with pytest.raises(ValueError, match="disagrees"):
    sparsegpt.sparsegpt_prune(w, h, 0.3, blocksize=16, nm=(2, 4))
  with pytest.raises(ValueError, match="ratio"):
    sparsegpt.sparsegpt_prune(w, h, 1.5)
  with pytest.raises(ValueError):
    sparsegpt.sparsegpt_prune(w, h[:8, :8], 0.5)


def test_block_prune_counts_round_half_to_even():
  # 0.5 * 3 * i2 for i2 = 1, 2, 3 -> round(1.5)=2, round(3)=3, round(4.5)=4
  np.testing.assert_array_equal(sparsegpt.block_prune_counts(0.5, 3, 3, 1), [2, 1, 1])
  assert sparsegpt.block_prune_counts(0.3, 768, 3072, 128).sum() == round(0.3 * 768 * 3072)


# --- in the model: N:M masks, sequential calibration, whole runs -----------------------------

from blockprune_jax.prune import calibration  # noqa: E402  pylint: disable=wrong-import-position
from blockprune_jax import model as model_lib  # noqa: E402  pylint: disable=wrong-import-position
from blockprune_jax.prune import pruning  # noqa: E402  pylint: disable=wrong-import-position
from blockprune_jax.errors import UserError  # noqa: E402  pylint: disable=wrong-import-position

TINY = model_lib.GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=4, n_head=2,
                            dropout=0.0)


def _zeros_per_group(k, m):
  """k [in, out] -> [in // m, out]: zeros in each group of m consecutive inputs per output."""
  k = np.asarray(k)
  return (k.reshape(k.shape[0] // m, m, k.shape[1]) == 0).sum(axis=1)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_nm_masks_of_score_methods(method):
  params = model_lib.init_params(TINY, 0)
  ids = np.random.RandomState(0).randint(0, 100, (2, 16))
  stats = calibration.collect_stats(TINY, params, [ids])
  masks = pruning.compute_masks(params, [0.5, 0.0, 0.5, 0.0], method=method, targets="all",
                                stats=stats, pattern=(2, 4))
  pruned = pruning.apply_masks(params, masks)
  for l in range(4):
    for name in pruning.MATRICES:
      counts = _zeros_per_group(pruning.kernel(pruned, l, name), 4)
      np.testing.assert_array_equal(counts, 2 if l % 2 == 0 else 0, err_msg=f"{l} {name}")
  with pytest.raises(UserError, match="prune.pattern=2:4 needs every block's ratio"):
    pruning.compute_masks(params, [0.3] * 4, method=method, stats=stats, pattern=(2, 4))
  with pytest.raises(UserError, match="prune.pattern"):
    pruning.parse_pattern("4:2")


@pytest.mark.slow
def test_sequential_calibration_sees_the_pruned_layers_below():
  """Layer l's Hessians come from the model whose layers < l are already pruned."""
  params = model_lib.init_params(TINY, 0)
  seqs = np.random.RandomState(1).randint(0, 100, (3, 16))
  seen = {}

  def prune_layer(p, layer, calib):
    seen[layer] = calib
    return pruning.prune_layer(p, layer, 0.5, None, method="magnitude", targets="all")
  pruned, masks = calibration.sequential_prune(TINY, params, seqs, collection="hessian",
                                               prune_layer=prune_layer, batch_size=2)
  assert sorted(masks) == [f"h_{l}" for l in range(4)]
  model = model_lib.GPT2(TINY)
  for l in (1, 3):
    # The reference: the full model with layers < l pruned and layers >= l as they were.
    mixed = {k: (pruned[k] if k.startswith("h_") and int(k[2:]) < l else v)
             for k, v in params.items()}
    for which, tree in (("pruned below", mixed), ("dense", params)):
      _, state = model.apply({"params": tree}, jnp.asarray(seqs), mutable=["hessian"])
      want = 2.0 * np.asarray(state["hessian"][f"h_{l}"]["mlp"]["c_fc_in"][0]) / seqs.size
      got = np.asarray(seen[l]["mlp"]["c_fc_in"])
      if which == "pruned below":
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
      else:  # and that differs from calibrating on the dense model
        assert np.abs(got - want).max() > 1e-3 * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.parametrize("pattern,ratios", [("2:4", (0.0, 0.5)), ("unstructured", (0.3, 0.6))])
def test_sparsegpt_run_exports_exact_zeros(tmp_path, pattern, ratios):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(prune__method="sparsegpt", prune__pattern=pattern, prune__targets="all",
                       prune__allocation="explicit", prune__ratios=ratios,
                       prune__sparsegpt_blocksize=16, prune__calib_batches=4,
                       train__steps=3, export__hf=True)
  from blockprune_jax import pipeline  # pylint: disable=import-outside-toplevel
  r = pipeline.run(config, str(tmp_path / "run"))
  assert r["pruning"]["method"] == "sparsegpt" and r["pruning"]["pattern"] == pattern
  assert r["pruning"]["sequential"] and r["pruning"]["sparsegpt_blocksize"] == 16
  assert "oneshot" in r and r["oneshot"]["perplexity"]["validation"] > 0
  hf = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
  for l, ratio in enumerate(ratios):
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
      w = hf[f"transformer.h.{l}.{name}.weight"]  # HF Conv1D: [in, out], our layout
      if pattern == "2:4":  # after masked fine-tuning, still exactly 2 zeros in every 4
        np.testing.assert_array_equal(_zeros_per_group(w, 4), 2 if ratio else 0)
      else:
        assert int((w == 0).sum()) == round(ratio * w.size)
