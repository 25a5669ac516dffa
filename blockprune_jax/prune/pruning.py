"""Pruning as pure transforms of the GPT-2 parameter tree: criteria -> masks -> masked params.

A method is a `Criterion` registered by name (CRITERIA): a score function (the lowest scores
are pruned) or, for methods that rewrite the kept weights (SparseGPT), a layer transform, with
its properties and options (the keys prune.<method>_<option>). configs/base.py's key table reads
the registry, so a new method is one module plus one `register(...)` call.

A mask tree holds the pruned kernels' paths only, True = kept; kernels are [in, out] like HF's
Conv1D `.weight`, so a mask compares element for element with torch.nn.utils.prune's. Counts
are exact: a ratio r over n elements zeroes round(r * n) of them (Python's round, as torch
does), picked by ranking, never by a float threshold that ties could make overshoot.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockprune_jax.prune import allocation
from blockprune_jax import model as model_lib
from blockprune_jax.prune import sparsegpt
from blockprune_jax import trees
from blockprune_jax.errors import UserError
from blockprune_jax.rules import Option

MATRICES = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
TARGETS = {"mlp": MATRICES[2:], "attn": MATRICES[:2], "all": MATRICES}
SCOPES = ("matrix", "block", "global")
# results.json's per-layer sparsity fields (the prefix keeps the two c_proj apart)
SPARSITY_FIELDS = {"mlp/c_fc": "c_fc", "mlp/c_proj": "c_proj",
                   "attn/c_attn": "attn_c_attn", "attn/c_proj": "attn_c_proj"}


def target_names(targets: str) -> list[str]:
  """`prune.targets` -> matrix names (mlp -> ['mlp/c_fc', 'mlp/c_proj'])."""
  if targets not in TARGETS:
    raise UserError(f"prune.targets={targets!r}: expected one of {', '.join(TARGETS)}")
  return list(TARGETS[targets])


def n_layers(params) -> int:
  return sum(1 for k in params if k.startswith("h_") and k[2:].isdigit())


def kernel_path(layer: int, name: str) -> tuple:  # ('h_0', 'mlp', 'c_fc', 'kernel')
  return (f"h_{layer}", *name.split("/"), "kernel")


def kernel(params, layer: int, name: str):
  return trees.get_path(params, kernel_path(layer, name))


def targeted_sizes(params, targets: str) -> list[int]:
  """[n_layer] parameters of each layer's targeted kernels (the allocations' weights)."""
  names = target_names(targets)
  return [sum(int(np.prod(kernel(params, l, n).shape)) for n in names)
          for l in range(n_layers(params))]


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
  """`prune.pattern` -> None (unstructured) or (n, m): n zeros in every m."""
  if pattern == "unstructured":
    return None
  try:
    n, m = (int(x) for x in pattern.split(":"))
  except ValueError:
    n = m = 0
  if not 0 < n < m:
    raise UserError(f"prune.pattern={pattern!r}: expected unstructured or N:M with 0 < N < M, "
                    "e.g. 2:4")
  return n, m


class MatrixInfo(NamedTuple):
  """What a score function may use besides the kernel."""
  layer: int
  name: str  # 'mlp/c_fc', ...
  key: Optional[jax.Array]  # PRNG key of the run (random)
  norm: Optional[jax.Array]  # [in] ||X_i|| of the matrix's calibration inputs (wanda)
  options: Optional[dict] = None  # the method's option values (Criterion.options), by name


@dataclasses.dataclass(frozen=True)
class Criterion:
  """A pruning method: one of score, unit_score or prune_matrix."""
  name: str
  score: Optional[Callable] = None  # (w [in, out], MatrixInfo) -> scores [in, out]
  per_output: bool = False  # ranks within each output unit (a column of w): scope matrix only
  calibration: str = ""  # what it needs from calibration data: '' | 'norms' | 'hessian'
  unit_score: Optional[Callable] = None  # (params, layer) -> [units]: whole MLP hidden units
  # (w, hessian, ratio, nm, options) -> (w_new, keep): rewrites the kept weights, always
  # calibrated layer by layer on the already pruned layers below
  prune_matrix: Optional[Callable] = None
  options: tuple[Option, ...] = ()  # the keys prune.<name>_<option>; values via options_of
  nm: bool = True  # supports prune.pattern=N:M
  needs_key: bool = False  # scores from the run's PRNG key (a control)
  compactable: bool = False  # removes whole MLP units: evaluable smaller (prune.compact)

  @property
  def sequential_only(self) -> bool:
    return self.prune_matrix is not None


CRITERIA: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
  CRITERIA[criterion.name] = criterion
  return criterion


def criterion(method: str) -> Criterion:
  if method not in CRITERIA:
    raise UserError(f"prune.method={method!r}: expected none or one of {', '.join(CRITERIA)}")
  return CRITERIA[method]


def option_keys() -> dict[str, Option]:
  """{'sparsegpt_damp': Option, ...}: every registered method's options, keys of prune.*."""
  return {f"{name}_{o.name}": o for name, c in CRITERIA.items() for o in c.options}


def _with_defaults(crit: Criterion, options: Optional[dict]) -> dict:
  return {o.name: (options or {}).get(o.name, o.default) for o in crit.options}


def options_of(prune) -> dict[str, Any]:
  """{option name: value} of the configured method."""
  method = prune["method"]
  return {o.name: prune[f"{method}_{o.name}"]
          for o in (CRITERIA[method].options if method in CRITERIA else ())}


def _random_score(w, info: MatrixInfo):
  # Keyed by (layer, matrix), not by position among the targets: a matrix gets the same
  # random scores whatever else is pruned, and at every GMP update (so masks nest).
  key = jax.random.fold_in(jax.random.fold_in(info.key, info.layer), MATRICES.index(info.name))
  return jax.random.uniform(key, w.shape)


def _unit_norms(params, layer):
  """||c_fc[:, k]|| * ||c_proj[k, :]||: either side alone ignores half of what unit k does."""
  mlp = params[f"h_{layer}"]["mlp"]
  return (jnp.linalg.norm(mlp["c_fc"]["kernel"], axis=0)
          * jnp.linalg.norm(mlp["c_proj"]["kernel"], axis=1))


def _sparsegpt_matrix(w, hessian, ratio, nm, options):
  return sparsegpt.sparsegpt_prune(w, hessian, None if nm else ratio, nm=nm,
                                   blocksize=int(options["blocksize"]),
                                   damp=float(options["damp"]))


register(Criterion("magnitude", score=lambda w, info: jnp.abs(w)))
register(Criterion("random", score=_random_score, nm=False, needs_key=True))
# Wanda (Sun et al. 2023): |W_ij| * ||X_i||.
register(Criterion("wanda", score=lambda w, info: jnp.abs(w) * info.norm[:, None],
                   per_output=True, calibration="norms"))
register(Criterion("neurons", unit_score=_unit_norms, nm=False, compactable=True))
register(Criterion("sparsegpt", prune_matrix=_sparsegpt_matrix, calibration="hessian",
                   options=sparsegpt.OPTIONS))


def check_method(method: str, *, targets: str, scope: str, pattern: Optional[tuple],
                 ratios: Sequence[float] = ()):
  """One-line errors for combinations no code path accepts (before any work starts)."""
  crit = criterion(method)
  target_names(targets)
  if scope not in SCOPES:
    raise UserError(f"prune.scope={scope!r}: expected one of {', '.join(SCOPES)}")
  if crit.unit_score is not None and targets != "mlp":
    raise UserError(f"prune.targets={targets!r} with prune.method={method}: structured neuron "
                    "pruning removes MLP hidden units; set --config.prune.targets=mlp")
  if scope != "matrix" and (crit.per_output or crit.prune_matrix or pattern):
    why = ("N:M groups are per output unit" if pattern else
           f"{method} prunes within each matrix" if crit.prune_matrix else
           "Wanda ranks weights within each output unit")
    raise UserError(f"prune.scope={scope!r} with prune.method={method}: {why}; "
                    "set --config.prune.scope=matrix")
  if pattern:
    if not crit.nm:
      raise UserError(f"prune.pattern=N:M works with "
                      f"{', '.join(n for n, c in CRITERIA.items() if c.nm)}, not "
                      f"prune.method={method}")
    n, m = pattern
    for r in ratios:
      if r != 0 and abs(r - n / m) > 1e-9:
        raise UserError(f"prune.pattern={n}:{m} needs every block's ratio to be 0 (dense) or "
                        f"{n / m:g}, got {r:g}: use allocation explicit/layer with ratios in "
                        f"{{0, {n / m:g}}}, or uniform with prune.target={n / m:g}")


def compute_masks(params, ratios_per_layer: Sequence[float], *, method: str, targets: str = "mlp",
                  scope: str = "matrix", blocks: int = 1, key=None, stats=None,
                  previous=None, pattern: Optional[tuple] = None,
                  options: Optional[dict] = None) -> dict:
  """Keep-masks of the targeted kernels (and c_fc biases for neurons), exact counts per scope.

  scope matrix: round(r_l * n) zeros per matrix (magnitude: torch's l1_unstructured mask);
  block / global: one ranking over a block's / every targeted matrix, round(sum_l r_l * n_l)
  zeros. Per-output criteria (wanda) zero round(r * in) per output unit. `key`: the same at
  every GMP update, so random masks nest. `previous` (gradual pruning): its dead weights rank
  first and the result is ANDed with it, so masks only grow. `pattern` (n, m) applies to
  layers whose ratio is not 0.
  """
  if method == "none":
    return {}
  n_layer = n_layers(params)
  ratios = [float(r) for r in ratios_per_layer]
  if len(ratios) != n_layer:
    raise ValueError(f"{len(ratios)} ratios for a model with {n_layer} layers")
  check_method(method, targets=targets, scope=scope, pattern=pattern, ratios=ratios)
  crit = CRITERIA[method]
  if crit.unit_score is not None:
    return _unit_masks(crit, params, ratios, scope, blocks, previous)
  if crit.score is None:
    raise ValueError(f"method {method} rewrites weights: use prune_layer (sequential)")
  if crit.calibration == "norms" and stats is None:
    raise ValueError(f"method {method} needs calibration stats (calibration.collect_stats)")
  if crit.needs_key and key is None:
    raise ValueError(f"method {method} needs a PRNG key")
  scores = _scores(crit, params, targets, key, stats, options)
  if previous is not None:  # dead weights rank first, so they stay among the zeros
    scores = {k: jnp.where(trees.get_path(previous, kernel_path(*k)), s, -jnp.inf)
              for k, s in scores.items()}
  if pattern:
    keep = {k: (sparsegpt.nm_keep(s, *pattern) if ratios[k[0]] else jnp.ones(s.shape, bool))
            for k, s in scores.items()}
  elif crit.per_output:
    keep = {(l, n): _keep_per_column(s, np.int32(round(ratios[l] * s.shape[0])))
            for (l, n), s in scores.items()}
  else:
    keep = _keep_in_groups(scores, ratios, _scope_groups(scope, list(scores), n_layer, blocks))
  masks = {}
  for (l, n), m in keep.items():
    if previous is not None:
      m = m & trees.get_path(previous, kernel_path(l, n))
    trees.set_path(masks, kernel_path(l, n), m)
  return masks


def prune_layer(params, layer: int, ratio: float, calib, *, method: str, targets: str,
                pattern: Optional[tuple] = None, options: Optional[dict] = None):
  """(params with layer `layer` pruned, its masks {'h_l': ...}) from its own calibration
  statistics `calib` ({'mlp': {'c_fc_in': sum x^2 [in] or H [in, in], ...}}), taken through the
  already pruned layers below (calibration.sequential_prune)."""
  crit = criterion(method)
  masks = {}
  if crit.prune_matrix is None:  # a score criterion: rank this layer alone
    one = {"h_0": params[f"h_{layer}"]}
    stats = {"h_0": calib} if crit.calibration == "norms" else None
    m = compute_masks(one, [ratio], method=method, targets=targets, stats=stats,
                      pattern=pattern, options=options)
    masks = {f"h_{layer}": m["h_0"]}
    return apply_masks(params, masks), masks
  new = jax.tree.map(lambda x: x, params)
  for n in target_names(targets):
    module, dense = n.split("/")
    w = kernel(params, layer, n)
    if ratio == 0:
      keep = jnp.ones(w.shape, bool)
    else:
      w, keep = crit.prune_matrix(w, calib[module][f"{dense}_in"], ratio, pattern,
                                  _with_defaults(crit, options))
    trees.set_path(new, kernel_path(layer, n), w)
    trees.set_path(masks, kernel_path(layer, n), keep)
  return apply_masks(new, masks), masks


def input_norms(stats) -> dict:
  """Calibration sums -> {(layer, 'mlp/c_fc'): ||X_i||_2 [in]}; also takes the raw sown
  collection (tuples summed), or either wrapped in {'stats': ...}."""
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


def _scores(crit, params, targets, key=None, stats=None, options=None) -> dict:
  """{(layer, matrix): scores} of a score criterion over the targeted kernels."""
  norms = input_norms(stats) if crit.calibration == "norms" else {}
  info = lambda l, n: MatrixInfo(l, n, key, norms.get((l, n)), _with_defaults(crit, options))
  return {(l, n): crit.score(kernel(params, l, n), info(l, n))
          for l in range(n_layers(params)) for n in target_names(targets)}


def layer_scores(method: str, params, stats, targets: str) -> list[list]:
  """[n_layer][matrix] score arrays of a score criterion (OWL's outlier statistics)."""
  scores = _scores(criterion(method), params, targets, stats=stats)
  return [[s for (l, _), s in scores.items() if l == layer] for layer in range(n_layers(params))]


def apply_masks(params, masks):
  """params (or any tree shaped like them: gradients, moments) zeroed where a mask is False."""
  if not isinstance(masks, dict):
    m = masks if masks.dtype == jnp.bool_ else masks != 0
    return jnp.where(m, params, jnp.zeros((), params.dtype))
  out = dict(params)
  for k, m in masks.items():
    out[k] = apply_masks(params[k], m)
  return out


@jax.jit
def _zero_counts(kernels):
  return [jnp.sum(k == 0) for k in kernels]


def sparsity(params, n_layer: int, blocks: int, targets: str) -> dict:
  """Fractions of exact zeros in the kernels, biases not counted (results.json "sparsity"):
  overall and per block over the targeted kernels, per layer over all four whatever `targets`
  is, so a report shows everything."""
  names = target_names(targets)
  keys = [(l, n) for l in range(n_layer) for n in MATRICES]
  counts = jax.device_get(_zero_counts([kernel(params, l, n) for l, n in keys]))  # one call
  zeros = {k: int(c) for k, c in zip(keys, counts)}
  sizes = {(l, n): int(np.prod(kernel(params, l, n).shape)) for l, n in keys}
  frac = lambda ks: sum(zeros[k] for k in ks) / max(sum(sizes[k] for k in ks), 1)

  layer_blocks = allocation.block_layers(n_layer, blocks)
  per_layer = [{"layer": l, "block": b, **{SPARSITY_FIELDS[n]: frac([(l, n)]) for n in MATRICES}}
               for b, layers in enumerate(layer_blocks) for l in layers]
  return {"overall": frac([(l, n) for l in range(n_layer) for n in names]),
          "per_block": [frac([(l, n) for l in layers for n in names]) for layers in layer_blocks],
          "per_layer": per_layer}


def compact_mlp(params, masks) -> tuple[dict, tuple[int, ...]]:
  """(params whose MLPs keep only their live units, widths for GPT2Config.mlp_widths): the same
  logits as the masked dense model. A layer keeps at least one (zero) unit so shapes stay valid."""
  masked = apply_masks(params, masks)
  out, widths = dict(masked), []
  for l in range(n_layers(params)):
    layer_mask = trees.get_path(masks, (f"h_{l}", "mlp", "c_fc", "kernel"))
    fc, proj = masked[f"h_{l}"]["mlp"]["c_fc"], masked[f"h_{l}"]["mlp"]["c_proj"]
    alive = (np.ones(fc["kernel"].shape[1], bool) if layer_mask is None
             else np.asarray(jnp.any(layer_mask, axis=0)))
    idx = np.flatnonzero(alive) if alive.any() else np.array([0])
    out[f"h_{l}"] = {**masked[f"h_{l}"], "mlp": {
        "c_fc": {"kernel": jnp.asarray(fc["kernel"])[:, idx], "bias": jnp.asarray(fc["bias"])[idx]},
        "c_proj": {"kernel": jnp.asarray(proj["kernel"])[idx, :], "bias": proj["bias"]}}}
    widths.append(int(idx.size))
  return out, tuple(widths)


def compacted_config(cfg: model_lib.GPT2Config, widths) -> model_lib.GPT2Config:
  return dataclasses.replace(cfg, mlp_widths=tuple(int(w) for w in widths))


def _order_key(x):
  """float32 -> uint32 in the same order (-0 is +0, as in a comparison)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_smallest_key(keys, k):
  """The k-th smallest (1-based) of uint32 `keys` along the last axis, [..., 1].

  A bitwise binary search (32 compare-and-sum passes) instead of a sort: ~10x faster for a
  GPT-2 matrix on a CPU, where XLA's sort is one thread of comparisons.
  """
  def bit(i, t):
    trial = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    # Keep the bit off while fewer than k keys lie below the trial value: the answer is >= it.
    below = jnp.sum(keys < trial, axis=-1, keepdims=True, dtype=jnp.int32)
    return jnp.where(below < k, trial, t)
  start = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
  return jax.lax.fori_loop(0, 32, bit, start)


def _smallest_k(scores, k):
  """bool mask of exactly k smallest entries along the last axis (ties: lower index first).

  k may be traced: one compile serves every ratio of a GMP schedule or an allocation search.
  """
  n = scores.shape[-1]
  keys = _order_key(scores)
  thr = _kth_smallest_key(keys, jnp.clip(k, 1, n))
  below = keys < thr
  tied = keys == thr
  still_needed = k - jnp.sum(below, axis=-1, keepdims=True)
  return (k > 0) & (below | (tied & (jnp.cumsum(tied, axis=-1) <= still_needed)))


@jax.jit
def _keep_group(scores: tuple, k):
  """One ranking over several score arrays: keep-masks with exactly k False in total."""
  flat = jnp.concatenate([s.reshape(-1) for s in scores])
  parts = jnp.split(~_smallest_k(flat, k), np.cumsum([s.size for s in scores])[:-1])
  return [part.reshape(s.shape) for part, s in zip(parts, scores)]


@jax.jit
def _keep_per_column(scores, k):
  """scores [in, out] -> keep [in, out] with exactly k False in every column."""
  return ~_smallest_k(scores.T, k).T


def _scope_groups(scope: str, keys: list, n_layer: int, blocks: int) -> list[list]:
  """Score keys (layer, name) ranked together: each alone, per block, or all."""
  if scope == "matrix":
    return [[k] for k in keys]
  if scope == "block":
    return [[k for k in keys if k[0] in layers]
            for layers in allocation.block_layers(n_layer, blocks)]
  return [list(keys)]


def _keep_in_groups(scores: dict, ratios, groups) -> dict:
  """Ranks scores {(layer, name): array} together within each group: round(sum_l r_l * n_l)
  zeros per group."""
  keep = {}
  for group in groups:
    shared = {ratios[l] for l, _ in group}
    if len(shared) == 1:  # the literal round(r * n), bit for bit torch's count for one matrix
      n_prune = round(shared.pop() * sum(scores[k].size for k in group))
    else:
      n_prune = round(sum(ratios[l] * scores[(l, n)].size for l, n in group))
    keep.update(zip(group, _keep_group(tuple(scores[k] for k in group), np.int32(n_prune))))
  return keep


def _unit_masks(crit, params, ratios, scope, blocks, previous) -> dict:
  alive = {l: (True if previous is None else
               jnp.any(trees.get_path(previous, kernel_path(l, "mlp/c_fc")), axis=0))
           for l in range(len(ratios))}
  scores = {(l, "units"): jnp.where(alive[l], crit.unit_score(params, l), -jnp.inf)
            for l in range(len(ratios))}
  keep = _keep_in_groups(scores, ratios, _scope_groups(scope, list(scores), len(ratios), blocks))
  masks = {}
  for (l, _), units in keep.items():
    units = units & alive[l]
    d, f = params[f"h_{l}"]["mlp"]["c_fc"]["kernel"].shape
    masks[f"h_{l}"] = {"mlp": {
        "c_fc": {"kernel": jnp.broadcast_to(units[None, :], (d, f)), "bias": units},
        "c_proj": {"kernel": jnp.broadcast_to(units[:, None], (f, d))}}}
  return masks
