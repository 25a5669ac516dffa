"""SparseGPT against a plain NumPy float64 transcription of the reference `fasterprune`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockprune_jax import sparsegpt

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
