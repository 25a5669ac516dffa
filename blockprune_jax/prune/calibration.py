"""Calibration: what the data-aware criteria (wanda, sparsegpt, OWL) learn from train sequences,
and the sequences measured allocations are scored on.

    calibration_sequences(config, streams)        -> [n, T] token ids, picked by seed
    collect_stats(cfg, params, batches)           -> sum of x**2 per input of every matrix
    sequential_prune(cfg, params, seqs, ...)      -> layer by layer, each layer calibrated on the
                                                     outputs of the already pruned layers below

The model records a matrix's inputs only when asked (model._sow_inputs: collection 'stats' for
sums of squares, 'hessian' for sums of outer products), so nothing here touches training.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from blockprune_jax import data as data_lib
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax.errors import UserError


# The seeds of the two picks, so the loss measured allocations are scored by is never taken on
# the very sequences whose statistics chose the masks.
STATS, SCORE = 7, 8


def calibration_sequences(config, streams, purpose: int = STATS, with_labels: bool = False):
  """`prune.calib_batches` sequences [n, data.seq_len] (+1 with labels), picked by `seed`.

  STATS: train sequences for the statistics the criteria use. SCORE: sequences of the split
  `prune.score_split` for the loss that measured allocations (sensitivity, search) are scored
  by; `validation` there when the model was trained on this train split, which it may have
  memorised (its loss on it then says little about held-out text, docs/studies.md).
  """
  split = config.prune.score_split if purpose == SCORE else "train"
  seqs = data_lib.train_sequences(streams.get(split), config.data.seq_len)
  n = min(config.prune.calib_batches, len(seqs))
  if n < 1:
    raise UserError(f"prune.calib_batches must be >= 1 and the {split} split must hold a "
                    f"sequence of data.seq_len + 1 = {config.data.seq_len + 1} tokens")
  pick = np.random.default_rng([config.seed, purpose]).choice(len(seqs), n, replace=False)
  return seqs[np.sort(pick)] if with_labels else seqs[np.sort(pick), :-1]


def loss_function(model_cfg: model_lib.GPT2Config, seqs, mesh, batch_size: int):
  """params -> mean next-token NLL over `seqs` [n, T + 1]: measured allocations call it hundreds
  of times with other masks, so it is one compiled program, never retraced."""
  step = eval_lib.make_eval_step(model_lib.logits_fn(model_cfg), mesh)
  n_dev = mesh.devices.size
  batch = parallel.round_up(max(1, min(batch_size, len(seqs))), n_dev)
  total = parallel.round_up(len(seqs), batch)
  inputs = np.zeros((total, seqs.shape[1] - 1), np.int32)
  labels, weights = np.zeros_like(inputs), np.zeros(inputs.shape, np.float32)
  inputs[:len(seqs)], labels[:len(seqs)], weights[:len(seqs)] = seqs[:, :-1], seqs[:, 1:], 1.0
  batches = [parallel.shard_batch((inputs[i:i + batch], labels[i:i + batch],
                                   weights[i:i + batch]), mesh) for i in range(0, total, batch)]

  def loss(params):
    params = parallel.replicate(params, mesh)
    sums = jax.device_get([step(params, *b) for b in batches])
    return float(sum(float(s) for s, _ in sums) / sum(float(c) for _, c in sums))
  return loss


def _summed(tree):
  """A sown collection with each tuple (one element per call) added up."""
  return jax.tree.map(lambda t: sum(t[1:], t[0]), tree, is_leaf=lambda x: isinstance(x, tuple))


def collect_stats(cfg: model_lib.GPT2Config, params, batches) -> dict:
  """Sums over all tokens of x**2 per input of every matrix ({'h_0': {'mlp': {'c_fc_in': [D],
  ...}}}) over batches of token ids [batch, time]."""
  model = model_lib.GPT2(cfg)

  @jax.jit
  def sums(p, ids):
    _, state = model.apply({"params": p}, ids, mutable=["stats"])
    return _summed(state["stats"])

  total = None
  for ids in batches:
    s = sums(params, jnp.asarray(ids))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  if total is None:
    raise ValueError("collect_stats got no batches")
  return total


@functools.lru_cache(maxsize=None)
def _block_fns(cfg: model_lib.GPT2Config, layer: int, collection: str):
  """Jitted (statistics of a block's matrix inputs, block output); blocks of equal MLP width
  share layer 0's Block module, so they share one compilation."""
  block = model_lib.Block(cfg, layer if cfg.mlp_widths else 0)

  @jax.jit
  def stats(p, x):
    _, state = block.apply({"params": p}, x, train=False, mutable=[collection])
    return _summed(state[collection])

  @jax.jit
  def forward(p, x):
    return block.apply({"params": p}, x, train=False)
  return stats, forward


def sequential_prune(cfg: model_lib.GPT2Config, params, seqs, *, collection: str, prune_layer,
                     batch_size: int = 8):
  """Prunes layer by layer, front to back, as the SparseGPT and Wanda references do.

  Layer l's statistics come from its inputs as the already pruned layers < l compute them, and
  all matrices of a layer take their inputs from the same forward pass.

  collection: 'stats' (sums of x**2 [in]) or 'hessian' (H = 2/N sum x x^T [in, in]);
  prune_layer: (params, layer, calib) -> (params, that layer's masks). Returns (pruned params,
  every layer's masks).
  """
  embed = jax.jit(model_lib.embed)
  xs = [embed(params, jnp.asarray(seqs[i:i + batch_size]))
        for i in range(0, len(seqs), batch_size)]
  n_tokens = int(np.prod(np.shape(seqs)))
  masks = {}
  for l in range(cfg.n_layer):
    stats_fn, forward = _block_fns(cfg, l, collection)
    calib = None
    for x in xs:
      s = stats_fn(params[f"h_{l}"], x)
      calib = s if calib is None else jax.tree.map(jnp.add, calib, s)
    if collection == "hessian":
      calib = jax.tree.map(lambda h: 2.0 * h / n_tokens, calib)
    params, layer_masks = prune_layer(params, l, calib)
    masks.update(layer_masks)
    xs = [forward(params[f"h_{l}"], x) for x in xs]  # through the pruned layer
  return params, masks
