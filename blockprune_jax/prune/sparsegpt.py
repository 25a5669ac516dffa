"""SparseGPT (Frantar & Alistarh 2023) as pure, jit-compiled transforms of one kernel.

    hessian_sum(x) -> (sum, count);  finalize_hessian(sum, count) -> H [in, in]
    sparsegpt_prune(w, h, ratio)   -> (w_new [in, out], keep [in, out])   unstructured
    sparsegpt_prune(w, h, None, nm=(2, 4))                                 N:M
    nm_keep(scores, n, m)          -> keep [in, out]                       N:M mask only

Layout: our kernels are [in, out] (HF Conv1D, Flax Dense). The paper and the reference code
(IST-DASLab/sparsegpt, `SparseGPT.fasterprune`) work on W = w.T, [out, in]: rows are output
units, columns the input features that the Hessian H = 2/n sum_t x_t x_t^T [in, in] couples.
Everything below that says "column" means an input feature, as in the reference.

Differences from the reference (the rest follows it step by step):
  * Unstructured counts are exact: block b (inputs i1..i2) prunes exactly
    k_b = round(r * out * i2) - round(r * out * i1) entries (Python's round, half to even),
    so the matrix has exactly round(r * out * in) zeros, as pruning.py's other methods do.
    The reference prunes every entry <= the int(numel * r)-th smallest score of the block,
    which ties can overshoot and which floors instead of rounding.
  * Ties are broken deterministically: the lower flat index of the [out, count] block
    (unstructured) or the lower input index of an N:M group is pruned first.
  * The arithmetic runs in the inputs' float type (float32, or float64 under x64), never
    lower; the reference always uses float32.
"""
import functools
import math
from typing import Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from blockprune_jax.rules import POSITIVE, RATE, Option

# The method's settings (keys prune.sparsegpt_damp / prune.sparsegpt_blocksize): the defaults
# are the reference's, written here once.
OPTIONS = (Option("damp", 0.01, RATE, "sparsegpt: dampening, a fraction of mean(diag H)"),
           Option("blocksize", 128, POSITIVE, "sparsegpt: columns whose mask is chosen together"))
_DEFAULT = {o.name: o.default for o in OPTIONS}

_HIGHEST = lax.Precision.HIGHEST  # no TF32 / bf16 passes: the updates compound block to block


# --- calibration Hessian ------------------------------------------------------------


def _float_type(*arrays):
  """The arrays' promoted float type, at least float32 (bf16 activations are widened)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def hessian_sum(x):
  """x [..., in] calibration inputs -> (sum_t x_t x_t^T [in, in], token count).

  Every leading axis counts as tokens. The sum is float32 (float64 if x is), so a caller can add
  batches up and call finalize_hessian once; the count is the static number of tokens.
  """
  flat = x.reshape(-1, x.shape[-1]).astype(_float_type(x))
  return jnp.matmul(flat.T, flat, precision=_HIGHEST), flat.shape[0]


def finalize_hessian(total, count):
  """H = 2 * sum / count [in, in]: the Hessian of the layer's squared output error."""
  return 2.0 * total / count


def hessian(x):
  """H [in, in] of one batch x [..., in]: finalize_hessian(*hessian_sum(x))."""
  return finalize_hessian(*hessian_sum(x))


# --- N:M masks ----------------------------------------------------------------------


def _ranks_last(scores):
  """scores [..., m] -> int [..., m]: each entry's place in a stable ascending sort.

  Pairwise comparisons (m is small: 4, 8) rather than a sort, so ties go to the lower index.
  """
  m = scores.shape[-1]
  idx = jnp.arange(m)
  mine, other = scores[..., :, None], scores[..., None, :]
  before = (other < mine) | ((other == mine) & (idx[None, :] < idx[:, None]))
  return jnp.sum(before, axis=-1)


def _check_nm(n: int, m: int, n_inputs: int):
  if not 0 < n < m:
    raise ValueError(f"N:M sparsity needs 0 < n < m, got n={n}, m={m}")
  if n_inputs % m:
    raise ValueError(f"N:M sparsity with m={m} needs the input size {n_inputs} to be a "
                     f"multiple of m")


def nm_keep(scores, n: int, m: int):
  """scores [in, out] -> keep [in, out] bool (True = kept), exactly n False per group.

  A group is m consecutive inputs (rows m*g ... m*g + m - 1) of one output column; its n lowest
  scores are pruned, the lower row first among ties. jit-able (n, m static).
  """
  n_in, n_out = scores.shape
  _check_nm(n, m, n_in)
  groups = scores.reshape(n_in // m, m, n_out).transpose(0, 2, 1)  # [in/m, out, m]
  keep = _ranks_last(groups) >= n
  return keep.transpose(0, 2, 1).reshape(n_in, n_out)


# --- SparseGPT ----------------------------------------------------------------------


def block_prune_counts(ratio: float, n_out: int, n_in: int, blocksize: int) -> np.ndarray:
  """[n_blocks] entries to prune per block of `blocksize` inputs, rounded cumulatively so they
  add up to exactly round(r * out * in), pruning.py's count (host-side: exact float64)."""
  ends = list(range(0, n_in, blocksize)) + [n_in]
  totals = [round(ratio * (n_out * e)) for e in ends]
  return np.diff(np.asarray(totals, np.int64)).astype(np.int32)


def _smallest_flat(scores, k):
  """scores [out, count] -> bool: the k smallest True (ties: lower flat index); k may be traced."""
  order = jnp.argsort(scores.reshape(-1), stable=True)
  ranks = jnp.zeros(scores.size, jnp.int32).at[order].set(jnp.arange(scores.size, dtype=jnp.int32))
  return (ranks < k).reshape(scores.shape)


def _prune_block(w1, hinv1, k, nm):
  """One block of the reference's loop: prune and compensate its columns one by one.

  w1 [out, count]: the block after the updates of earlier blocks; hinv1 [count, count]: its
  (upper triangular) diagonal block of the Cholesky factor of H^-1; k: entries to prune
  (unstructured only). Returns (q1 [out, count] pruned weights, err1 [out, count] scaled
  errors for the later blocks, pruned1 [out, count] bool).
  """
  n_out, count = w1.shape
  diag = jnp.diag(hinv1)
  cols = jnp.arange(count)
  if nm is None:  # one mask for the whole block, chosen before any of its updates
    pruned1 = _smallest_flat(w1 ** 2 / diag[None, :] ** 2, k)
  else:
    pruned1 = jnp.zeros(w1.shape, jnp.bool_)

  def group_mask(i, w1_now, pruned):
    # N:M groups are chosen from the weights as already updated by this block's columns < i.
    n, m = nm
    part = lax.dynamic_slice_in_dim(w1_now, i, m, axis=1) ** 2
    part = part / lax.dynamic_slice_in_dim(diag, i, m) ** 2
    return lax.dynamic_update_slice_in_dim(pruned, _ranks_last(part) < n, i, axis=1)

  def column(i, carry):
    w1_now, q1, err1, pruned = carry
    if nm is not None:
      pruned = lax.cond(i % nm[1] == 0, group_mask, lambda i, w, p: p, i, w1_now, pruned)
    w = w1_now[:, i]
    q = jnp.where(pruned[:, i], jnp.zeros((), w.dtype), w)  # pruned entries exactly 0.0
    err = (w - q) / hinv1[i, i]
    # Row i of the upper factor is zero left of i; masking makes "columns i.. only" explicit.
    row = jnp.where(cols >= i, hinv1[i], jnp.zeros((), hinv1.dtype))
    w1_now = w1_now - err[:, None] * row[None, :]
    return w1_now, q1.at[:, i].set(q), err1.at[:, i].set(err), pruned

  zeros = jnp.zeros_like(w1)
  _, q1, err1, pruned1 = lax.fori_loop(0, count, column, (w1, zeros, zeros, pruned1))
  return q1, err1, pruned1


def _inverse_hessian_factor(wt, h, damp):
  """(wt [out, in], h [in, in], damp) -> (wt with dead inputs zeroed, hinv [in, in]).

  As the reference: inputs never seen in calibration (H_ii == 0) get H_ii = 1 and their
  weights dropped; lambda = damp * mean(diag H) goes on the diagonal; hinv is the upper
  Cholesky factor of (H + lambda I)^-1 (reference: cholesky -> cholesky_inverse -> upper
  cholesky). jnp.linalg.cholesky gives the lower factor L, so the upper one is L^T.
  """
  dtype, n_in = wt.dtype, wt.shape[1]
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(dtype))
  wt = jnp.where(dead[None, :], jnp.zeros((), dtype), wt)
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(n_in, dtype=dtype)
  h_inv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), jnp.eye(n_in, dtype=dtype))
  return wt, jnp.linalg.cholesky(h_inv).T


@functools.partial(jax.jit, static_argnames=("blocksize", "nm"))
def _sparsegpt(w, h, counts, damp, *, blocksize: int, nm):
  """w [in, out], h [in, in], counts [n_blocks] int -> (w_new [in, out], keep [in, out])."""
  dtype = _float_type(w, h)
  wt = w.T.astype(dtype)  # [out, in], the reference's W
  n_in = wt.shape[1]

  wt, hinv = _inverse_hessian_factor(wt, h.astype(dtype), damp.astype(dtype))

  in_idx = jnp.arange(n_in)

  def block(i1, size, k, wt, pruned):
    i2 = i1 + size
    w1 = lax.dynamic_slice_in_dim(wt, i1, size, axis=1)
    hinv1 = lax.dynamic_slice(hinv, (i1, i1), (size, size))
    q1, err1, pruned1 = _prune_block(w1, hinv1, k, nm)
    wt = lax.dynamic_update_slice_in_dim(wt, q1, i1, axis=1)
    pruned = lax.dynamic_update_slice_in_dim(pruned, pruned1, i1, axis=1)
    # Lazy batch update of every later input: W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]. The full
    # width keeps shapes static; `where` leaves the finished columns untouched.
    rows = lax.dynamic_slice_in_dim(hinv, i1, size, axis=0)  # [size, in]
    update = jnp.matmul(err1, rows, precision=_HIGHEST)
    wt = jnp.where(in_idx[None, :] >= i2, wt - update, wt)
    return wt, pruned

  pruned = jnp.zeros(wt.shape, jnp.bool_)
  n_full = n_in // blocksize
  if n_full:
    def full_block(b, carry):
      return block(b * blocksize, blocksize, counts[b], *carry)
    wt, pruned = lax.fori_loop(0, n_full, full_block, (wt, pruned))
  if n_in % blocksize:  # the shorter last block, compiled once more with its own shape
    wt, pruned = block(n_full * blocksize, n_in % blocksize, counts[n_full], wt, pruned)
  return wt.T, ~pruned.T


def sparsegpt_prune(w, h, ratio: Optional[float], *, blocksize: int = _DEFAULT["blocksize"],
                    damp: float = _DEFAULT["damp"], nm: Optional[Sequence[int]] = None):
  """(w_new [in, out], keep [in, out]): one kernel pruned with optimal (OBS) updates of the rest.

  h: the calibration Hessian [in, in] (hessian_sum / finalize_hessian). ratio becomes exact
  per-block counts on the host (block_prune_counts), so one compilation serves every ratio;
  with nm=(n, m) it is None or n / m, and each group is chosen just before its first column is
  pruned, from the weights updated so far. Inputs with H_ii == 0 are zeroed but not counted as
  pruned, as in the reference.
  """
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"need w [in, out] and h [in, in], got {w.shape} and {h.shape}")
  n_in, n_out = w.shape
  if blocksize < 1:
    raise ValueError(f"blocksize must be positive, got {blocksize}")
  n_blocks = -(-n_in // blocksize)
  if nm is None:
    if ratio is None or not 0.0 <= float(ratio) <= 1.0:
      raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    counts = block_prune_counts(float(ratio), n_out, n_in, blocksize)
  else:
    n, m = (int(v) for v in nm)
    _check_nm(n, m, n_in)
    if blocksize % m:
      raise ValueError(f"N:M sparsity with m={m} needs blocksize={blocksize} to be a multiple "
                       f"of m")
    if ratio is not None and not math.isclose(float(ratio), n / m):
      raise ValueError(f"ratio={ratio} disagrees with {n}:{m} sparsity; pass None or {n / m}")
    nm = (n, m)
    counts = np.zeros(n_blocks, np.int32)  # unused: N:M fixes its own counts
  return _sparsegpt(w, h, jnp.asarray(counts), jnp.asarray(damp), blocksize=blocksize, nm=nm)
