"""Pruning as pure transforms of the GPT-2 parameter tree: scores -> masks -> masked params.

    pruning_plan(prune, params)                    -> block_layers, ratios per block / layer
    compute_masks(params, ratios_per_layer, ...)   -> masks (bool pytree, targeted leaves only)
    apply_masks(params, masks)                     -> params with pruned weights exactly 0.0

A mask tree has the paths of the parameters it prunes and nothing else, e.g.
{'h_0': {'mlp': {'c_fc': {'kernel': bool[D, F]}, 'c_proj': {'kernel': bool[F, D]}}}}
(True = kept). Kernels are [in, out], the layout of HF's Conv1D `.weight`, so a mask compares
element for element with torch.nn.utils.prune's `weight_mask` on the HF model.

Counts are exact (DESIGN.md "Ratio of a matrix"): a ratio r over n elements zeroes exactly
round(r * n) of them -- Python's round, as torch.nn.utils.prune does -- picked by sorting the
scores, never by a float threshold that ties could make overshoot.
"""
import dataclasses
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockprune_jax import allocation
from blockprune_jax import model as model_lib
from blockprune_jax import trees
from blockprune_jax.errors import UserError

MATRICES = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
TARGETS = {"mlp": MATRICES[2:], "attn": MATRICES[:2], "all": MATRICES}
METHODS = ("magnitude", "random", "wanda", "neurons")
SCOPES = ("matrix", "block", "global")
# measure_sparsity's per-layer field for each matrix (DESIGN.md results.json keeps `c_fc`,
# `c_proj` for the MLP; attention gets an `attn_` prefix so the two c_proj never collide).
SPARSITY_FIELDS = {"mlp/c_fc": "c_fc", "mlp/c_proj": "c_proj",
                   "attn/c_attn": "attn_c_attn", "attn/c_proj": "attn_c_proj"}


def target_names(targets: str) -> list[str]:
  """`prune.targets` -> matrix names: mlp -> ['mlp/c_fc', 'mlp/c_proj'], attn, all."""
  if targets not in TARGETS:
    raise UserError(f"prune.targets={targets!r}: expected one of {', '.join(TARGETS)}")
  return list(TARGETS[targets])


def n_layers(params) -> int:
  """Number of transformer blocks ('h_0' ... 'h_{L-1}') in a parameter tree."""
  return sum(1 for k in params if k.startswith("h_") and k[2:].isdigit())


def kernel(params, layer: int, name: str):
  """The [in, out] kernel of matrix `name` ('mlp/c_fc', ...) in layer `layer`."""
  module, dense = name.split("/")
  return params[f"h_{layer}"][module][dense]["kernel"]


def targeted_sizes(params, targets: str) -> list[int]:
  """[n_layer] parameter count of the targeted kernels of each layer (allocation weights)."""
  names = target_names(targets)
  return [sum(int(np.prod(kernel(params, l, n).shape)) for n in names)
          for l in range(n_layers(params))]


# --- the plan: which ratio for which layer -------------------------------------------


def pruning_plan(prune, params, stats=None) -> dict:
  """Allocation from the `prune.*` config keys for this model (results.json "pruning").

  Returns {"block_layers": [[0, 1, 2, 3], ...], "ratios_per_block": [...],
  "ratios_per_layer": [...]}. `stats` (calibration sums, see collect_stats) is needed for owl.
  """
  sizes = targeted_sizes(params, prune.targets)
  outliers = None
  if prune.allocation == "owl":
    if stats is None:
      raise ValueError("allocation owl needs calibration stats (collect_stats)")
    outliers = outlier_ratios(params, stats, targets=prune.targets,
                              threshold=float(prune.owl_threshold))
  per_layer, per_block = allocation.allocate(prune, sizes, outliers)
  return {"block_layers": allocation.block_layers(len(sizes), int(prune.blocks)),
          "ratios_per_block": per_block, "ratios_per_layer": per_layer}


# --- calibration: input norms for wanda and owl ----------------------------------------


def collect_stats(cfg: model_lib.GPT2Config, params, batches: Iterable) -> dict:
  """Sums over all tokens of x**2 per input feature of every matrix (GPT2's 'stats' collection).

  batches: iterable of int token arrays [batch, time]. Returns the sown tree with each tuple
  summed, e.g. {'h_0': {'mlp': {'c_fc_in': [D], 'c_proj_in': [F]}, 'attn': {...}}, ...}.
  """
  model = model_lib.GPT2(cfg)

  @jax.jit
  def sums(p, ids):
    _, state = model.apply({"params": p}, ids, mutable=["stats"])
    # Each sown entry is a tuple (one element per call); add them up.
    return jax.tree.map(lambda t: sum(t[1:], t[0]), state["stats"],
                        is_leaf=lambda x: isinstance(x, tuple))

  total = None
  for ids in batches:
    s = sums(params, jnp.asarray(ids))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
  if total is None:
    raise ValueError("collect_stats got no batches")
  return total


def input_norms(stats) -> dict:
  """Calibration sums -> {(layer, 'mlp/c_fc'): ||X_i||_2 [in]} for every matrix.

  Accepts collect_stats' tree, the raw mutable=['stats'] output (tuples are summed), or
  either wrapped in {'stats': ...}.
  """
  stats = stats.get("stats", stats)
  norms = {}
  for name in MATRICES:
    module, dense = name.split("/")
    for layer_key, layer_stats in stats.items():
      sumsq = layer_stats[module][f"{dense}_in"]
      if isinstance(sumsq, (tuple, list)):
        sumsq = sum(sumsq)
      norms[(int(layer_key[2:]), name)] = jnp.sqrt(jnp.asarray(sumsq, jnp.float32))
  return norms


def outlier_ratios(params, stats, *, targets: str, threshold: float) -> list[float]:
  """OWL's layerwise outlier ratio D_l (Yin et al. 2023), one per layer.

  Over the targeted kernels of a layer, with Wanda's score |W_ij| * ||X_i||: the fraction of
  elements whose score exceeds `threshold` (M) times the layer's mean score.
  """
  norms, names = input_norms(stats), target_names(targets)
  out = []
  for l in range(n_layers(params)):
    scores = [_wanda_score(kernel(params, l, n), norms[(l, n)]) for n in names]
    total = sum(s.size for s in scores)
    mean = sum(jnp.sum(s) for s in scores) / total
    out.append(float(sum(jnp.sum(s > threshold * mean) for s in scores) / total))
  return out


# --- masks ------------------------------------------------------------------------------


def compute_masks(params, ratios_per_layer: Sequence[float], *, method: str, targets: str = "mlp",
                  scope: str = "matrix", blocks: int = 1, key=None, stats=None,
                  previous=None) -> dict:
  """Keep-masks (True = kept) for the targeted kernels, exact counts per `scope`.

  Args:
    params: the parameter tree.
    ratios_per_layer: [n_layer] sparsity of each layer's targeted matrices.
    method: none (returns {}) | magnitude (|w|) | random (uniform scores from `key`, a
      control) | wanda (|W_ij| * ||X_i||, needs `stats`) | neurons (whole MLP hidden units,
      targets mlp only).
    targets: `prune.targets`.
    scope: where the count is taken. matrix: round(r_l * n) per matrix (magnitude: the same mask
      as torch's l1_unstructured). block: one ranking over all targeted matrices of a block,
      round(sum_l r_l * n_l) zeros. global: one ranking over every targeted matrix, round(S *
      n_total) zeros with S the parameter-weighted mean of ratios_per_layer.
      wanda ranks within each output unit (a column of our [in, out] kernel, a row of torch's
      [out, in] weight) and zeroes round(r * in) per column, so a matrix gets
      out * round(r * in) zeros; it supports scope matrix only.
      neurons scores unit k of a layer's MLP by ||c_fc[:, k]|| * ||c_proj[k, :]|| (the weight
      norms into and out of the unit: either side alone ignores half of what the unit does) and
      zeroes round(r * F) units per layer (or per block / globally with those scopes): c_fc
      kernel column k, c_fc bias k and c_proj kernel row k.
    blocks: `prune.blocks` (scope block).
    key: PRNG key for method random. Pass the same key at every GMP update so masks nest.
    stats: calibration sums (collect_stats) for wanda.
    previous: an earlier mask tree (gradual pruning): ranking happens among the weights it
      kept (the dead ones count first towards the zeros) and the result is ANDed with it, so
      masks only grow.
  Returns:
    the mask tree: bool leaves shaped like the kernels (plus the c_fc bias for neurons).
  """
  if method == "none":
    return {}
  names = target_names(targets)
  n_layer = n_layers(params)
  ratios = [float(r) for r in ratios_per_layer]
  if len(ratios) != n_layer:
    raise ValueError(f"{len(ratios)} ratios for a model with {n_layer} layers")
  if method not in METHODS:
    raise UserError(f"prune.method={method!r}: expected none or one of {', '.join(METHODS)}")
  if scope not in SCOPES:
    raise UserError(f"prune.scope={scope!r}: expected one of {', '.join(SCOPES)}")
  if method == "neurons":
    if targets != "mlp":
      raise UserError(f"prune.targets={targets!r} with prune.method=neurons: structured neuron "
                      "pruning removes MLP hidden units; set --config.prune.targets=mlp")
    return _neuron_masks(params, ratios, scope, blocks, previous)
  if method == "wanda" and scope != "matrix":
    raise UserError(f"prune.scope={scope!r} with prune.method=wanda: Wanda ranks weights within "
                    "each output unit; set --config.prune.scope=matrix")

  if method == "wanda" and stats is None:
    raise ValueError("method wanda needs calibration stats (collect_stats)")
  if method == "random" and key is None:
    raise ValueError("method random needs a PRNG key")
  norms = input_norms(stats) if method == "wanda" else None
  scores = {}
  for l in range(n_layer):
    for n in names:
      norm = None if norms is None else norms[(l, n)]
      s = _score(method, kernel(params, l, n), key=key, norm=norm, index=(l, MATRICES.index(n)))
      if previous is not None:  # dead weights rank first, so they stay among the zeros
        s = jnp.where(trees.get_path(previous, _kernel_path(l, n)), s, -jnp.inf)
      scores[(l, n)] = s

  if method == "wanda":
    keep = {(l, n): _keep_per_column(s, np.int32(round(ratios[l] * s.shape[0])))
            for (l, n), s in scores.items()}
  else:
    keep = _keep_in_groups(scores, ratios, _scope_groups(scope, list(scores), n_layer, blocks))
  masks = {}
  for (l, n), m in keep.items():
    if previous is not None:
      m = m & trees.get_path(previous, _kernel_path(l, n))
    trees.set_path(masks, _kernel_path(l, n), m)
  return masks


def apply_masks(params, masks):
  """params with every leaf that has a mask set to 0.0 where the mask is False.

  jit-able; leaves without a mask are returned as they are. Works on any tree shaped like the
  params (gradients, optimizer moments).
  """
  if not isinstance(masks, dict):
    m = masks if masks.dtype == jnp.bool_ else masks != 0
    return jnp.where(m, params, jnp.zeros((), params.dtype))
  out = dict(params)
  for k, m in masks.items():
    out[k] = apply_masks(params[k], m)
  return out


# The trainer masks gradients and optimizer updates with the same rule as parameters
# (DESIGN.md "Masked training": pruned weights stay exactly 0.0).
mask_gradients = apply_masks


def mask_count(masks) -> tuple[int, int]:
  """(pruned, total) elements over every leaf of a mask tree."""
  leaves = jax.tree.leaves(masks)
  return (int(sum(int(jnp.sum(~m)) for m in leaves)), int(sum(m.size for m in leaves)))


# --- gradual magnitude pruning (Zhu & Gupta 2017) ------------------------------------


def gmp_sparsity(step: int, *, s_init: float, s_final: float, start: int, end: int) -> float:
  """Cubic schedule: s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3 on [t0, t1].

  s_init before `start`, s_final from `end` on (masks are kept after the end).
  """
  if step < start:
    return float(s_init)
  if step >= end:
    return float(s_final)
  frac = (step - start) / (end - start)
  return float(s_final + (s_init - s_final) * (1.0 - frac) ** 3)


def gmp_update_steps(start: int, end: int, every: int) -> list[int]:
  """Mask-update steps t0, t0 + every, ... up to and including t1 (t1 always included)."""
  if every < 1:
    raise UserError(f"prune.every resolves to {every} steps; it must be at least 1 step")
  steps = list(range(int(start), int(end) + 1, int(every)))
  if not steps or steps[-1] != end:
    steps.append(int(end))
  return steps


def is_gmp_update_step(step: int, *, start: int, end: int, every: int) -> bool:
  """Whether masks are recomputed at `step` (see gmp_update_steps)."""
  return start <= step <= end and ((step - start) % every == 0 or step == end)


def scale_ratios(ratios_per_layer: Sequence[float], sparsity: float,
                 layer_sizes: Sequence[int]) -> list[float]:
  """The allocation's shape at overall sparsity `sparsity`: ratios * s / S.

  S is the parameter-weighted mean of ratios_per_layer (the final target of the schedule).
  """
  s_final = allocation.weighted_mean(ratios_per_layer, layer_sizes)
  if s_final <= 0:
    return [0.0] * len(ratios_per_layer)
  return [float(r) * sparsity / s_final for r in ratios_per_layer]


# --- measurement and compaction --------------------------------------------------------


def measure_sparsity(params, n_layer: int, blocks: int, targets: str) -> dict:
  """Fractions of exact zeros in the kernels (results.json "sparsity").

  Returns {"overall": over the targeted kernels, "per_block": [same, per block],
  "per_layer": [{"layer", "block", "c_fc", "c_proj", "attn_c_attn", "attn_c_proj"}, ...]}.
  Per-layer fields cover all four kernels whatever `targets` is, so a report shows everything:
  c_fc / c_proj are the MLP's, attn_c_attn / attn_c_proj the attention's. Biases are not
  counted (neurons also zeroes c_fc biases, which this leaves out).
  """
  names = target_names(targets)
  zeros = {(l, n): int(jnp.sum(kernel(params, l, n) == 0))
           for l in range(n_layer) for n in MATRICES}
  sizes = {(l, n): int(np.prod(kernel(params, l, n).shape))
           for l in range(n_layer) for n in MATRICES}
  frac = lambda keys: sum(zeros[k] for k in keys) / max(sum(sizes[k] for k in keys), 1)

  layer_blocks = allocation.block_layers(n_layer, blocks)
  per_layer = []
  for b, layers in enumerate(layer_blocks):
    for l in layers:
      per_layer.append({"layer": l, "block": b,
                        **{SPARSITY_FIELDS[n]: frac([(l, n)]) for n in MATRICES}})
  return {"overall": frac([(l, n) for l in range(n_layer) for n in names]),
          "per_block": [frac([(l, n) for l in layers for n in names]) for layers in layer_blocks],
          "per_layer": per_layer}


def compact_mlp(params, masks) -> tuple[dict, tuple[int, ...]]:
  """Drops pruned MLP hidden units so each layer's MLP is a smaller dense matrix.

  After `neurons` pruning, unit k of layer l is dead when its c_fc kernel column is masked.
  Returns (params with c_fc kernel [D, F_l], bias [F_l], c_proj kernel [F_l, D], widths) for
  model.GPT2Config(mlp_widths=widths); the logits equal the masked dense model's. A layer keeps
  at least one unit (with its masked, zero weights it contributes nothing) so shapes stay valid.
  """
  masked = apply_masks(params, masks)
  out, widths = dict(masked), []
  for l in range(n_layers(params)):
    layer_mask = trees.get_path(masks, (f"h_{l}", "mlp", "c_fc", "kernel"))
    fc = masked[f"h_{l}"]["mlp"]["c_fc"]
    width = fc["kernel"].shape[1]
    alive = np.ones(width, bool) if layer_mask is None else np.asarray(jnp.any(layer_mask, axis=0))
    idx = np.flatnonzero(alive) if alive.any() else np.array([0])
    mlp = masked[f"h_{l}"]["mlp"]
    out[f"h_{l}"] = {**masked[f"h_{l}"], "mlp": {
        "c_fc": {"kernel": jnp.asarray(fc["kernel"])[:, idx], "bias": jnp.asarray(fc["bias"])[idx]},
        "c_proj": {"kernel": jnp.asarray(mlp["c_proj"]["kernel"])[idx, :],
                   "bias": mlp["c_proj"]["bias"]}}}
    widths.append(int(idx.size))
  return out, tuple(widths)


def compacted_config(cfg: model_lib.GPT2Config, widths) -> model_lib.GPT2Config:
  """cfg for a model whose MLPs were compacted to `widths` (one per layer)."""
  return dataclasses.replace(cfg, mlp_widths=tuple(int(w) for w in widths))


# --- internals ----------------------------------------------------------------------------


def _score(method: str, w, *, key, norm, index):
  """Importance of each weight of kernel w [in, out]; the lowest-scored are pruned."""
  if method == "magnitude":
    return jnp.abs(w)
  if method == "random":
    # Keyed by (layer, matrix), not by position among the targets: a matrix gets the same
    # random scores whatever else is pruned, and at every GMP update (so masks nest).
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, index[0]), index[1]),
                              w.shape)
  return _wanda_score(w, norm)


def _wanda_score(w, norm):
  """|W_ij| * ||X_i||: w [in, out], norm [in] -> [in, out]."""
  return jnp.abs(w) * norm[:, None]


def _smallest_k(scores, k):
  """bool mask of the k smallest entries along the last axis (ties: the lower index first).

  Sorting finds the k-th smallest value; entries below it are taken, and of those equal to it
  only as many as are still needed, so exactly k are marked. k may be traced (one compile
  serves every ratio of a GMP schedule).
  """
  n = scores.shape[-1]
  ordered = jnp.sort(scores, axis=-1)
  thr = jnp.take(ordered, jnp.clip(k - 1, 0, n - 1), axis=-1)[..., None]
  below = scores < thr
  tied = scores == thr
  still_needed = k - jnp.sum(below, axis=-1, keepdims=True)
  return (k > 0) & (below | (tied & (jnp.cumsum(tied, axis=-1) <= still_needed)))


@jax.jit
def _keep_group(scores: tuple, k):
  """One ranking over several score arrays: keep-masks with exactly k False in total."""
  flat = jnp.concatenate([s.reshape(-1) for s in scores])
  keep = ~_smallest_k(flat, k)
  out, start = [], 0
  for s in scores:
    out.append(keep[start:start + s.size].reshape(s.shape))
    start += s.size
  return out


@jax.jit
def _keep_per_column(scores, k):
  """scores [in, out] -> keep [in, out] with exactly k False in every column."""
  return ~_smallest_k(scores.T, k).T


def _scope_groups(scope: str, keys: list, n_layer: int, blocks: int) -> list[list]:
  """Score keys (layer, name) ranked together: each alone (matrix), per block, or all (global)."""
  if scope == "matrix":
    return [[k] for k in keys]
  if scope == "block":
    return [[k for k in keys if k[0] in layers]
            for layers in allocation.block_layers(n_layer, blocks)]
  return [list(keys)]


def _keep_in_groups(scores: dict, ratios, groups) -> dict:
  """Ranks scores {(layer, name): array} together within each group of keys.

  A group's zeros are round(sum_l r_l * n_l): round(r * n) for a single matrix (torch's count),
  round(weighted mean ratio * group size) for a block or the whole model.
  """
  keep = {}
  for group in groups:
    shared = {ratios[l] for l, _ in group}
    if len(shared) == 1:  # the literal round(r * n), bit for bit torch's count for one matrix
      n_prune = round(shared.pop() * sum(scores[k].size for k in group))
    else:
      n_prune = round(sum(ratios[l] * scores[(l, n)].size for l, n in group))
    keep.update(zip(group, _keep_group(tuple(scores[k] for k in group), np.int32(n_prune))))
  return keep


def _neuron_masks(params, ratios, scope, blocks, previous) -> dict:
  """Structured masks for whole MLP hidden units (see compute_masks)."""
  scores = {}
  for l in range(len(ratios)):
    mlp = params[f"h_{l}"]["mlp"]
    s = (jnp.linalg.norm(mlp["c_fc"]["kernel"], axis=0)
         * jnp.linalg.norm(mlp["c_proj"]["kernel"], axis=1))  # [F]
    if previous is not None:
      alive = jnp.any(trees.get_path(previous, (f"h_{l}", "mlp", "c_fc", "kernel")), axis=0)
      s = jnp.where(alive, s, -jnp.inf)
    scores[(l, "units")] = s
  keep = _keep_in_groups(scores, ratios, _scope_groups(scope, list(scores), len(ratios), blocks))
  masks = {}
  for (l, _), units in keep.items():
    if previous is not None:
      units = units & jnp.any(trees.get_path(previous, (f"h_{l}", "mlp", "c_fc", "kernel")), axis=0)
    fc = params[f"h_{l}"]["mlp"]["c_fc"]["kernel"]
    d, f = fc.shape
    masks[f"h_{l}"] = {"mlp": {
        "c_fc": {"kernel": jnp.broadcast_to(units[None, :], (d, f)), "bias": units},
        "c_proj": {"kernel": jnp.broadcast_to(units[:, None], (f, d))}}}
  return masks


def _kernel_path(layer: int, name: str) -> tuple:
  return (f"h_{layer}", *name.split("/"), "kernel")
