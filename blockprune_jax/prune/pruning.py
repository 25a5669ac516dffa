"""Pruning as pure transforms of the GPT-2 parameter tree: criteria -> masks -> masked params.

    CRITERIA[name]                                  how a method scores (or prunes) weights
    compute_masks(params, ratios_per_layer, ...)    -> masks (bool pytree, targeted leaves only)
    apply_masks(params, masks)                      -> params with pruned weights exactly 0.0
    prune_layer(layer_params, ratio, ...)           one layer at a time (sequential calibration)

A method is a `Criterion` registered by name: a score function with one signature (the lowest
scores are pruned), or, for methods that also rewrite the kept weights (SparseGPT), a layer
transform, plus its properties (N:M support, compaction, calibration, a random key) and its
options (rules.Option: the keys prune.<method>_<option>, with their defaults). The config's
allowed `prune.method` values and the method keys come from the registry (keys.py), so a new
method with options is one module plus one `register(...)` call.

A mask tree has the paths of the parameters it prunes and nothing else, e.g.
{'h_0': {'mlp': {'c_fc': {'kernel': bool[D, F]}, 'c_proj': {'kernel': bool[F, D]}}}}
(True = kept). Kernels are [in, out], the layout of HF's Conv1D `.weight`, so a mask compares
element for element with torch.nn.utils.prune's `weight_mask` on the HF model.

Counts are exact (README, "What is computed, exactly"): a ratio r over n elements zeroes exactly
round(r * n) of them -- Python's round, as torch.nn.utils.prune does -- picked by sorting the
scores, never by a float threshold that ties could make overshoot.
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
# measure_sparsity's per-layer field for each matrix (results.json keeps `c_fc`, `c_proj` for
# the MLP; attention gets an `attn_` prefix so the two c_proj never collide).
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


def kernel_path(layer: int, name: str) -> tuple:
  """('h_0', 'mlp', 'c_fc', 'kernel') for layer 0's 'mlp/c_fc'."""
  return (f"h_{layer}", *name.split("/"), "kernel")


def kernel(params, layer: int, name: str):
  """The [in, out] kernel of matrix `name` ('mlp/c_fc', ...) in layer `layer`."""
  return trees.get_path(params, kernel_path(layer, name))


def targeted_sizes(params, targets: str) -> list[int]:
  """[n_layer] parameter count of the targeted kernels of each layer (allocation weights)."""
  names = target_names(targets)
  return [sum(int(np.prod(kernel(params, l, n).shape)) for n in names)
          for l in range(n_layers(params))]


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
  """`prune.pattern` -> None (unstructured) or (n, m) for 'N:M' (N zeros in every M)."""
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


# --- the criteria ---------------------------------------------------------------------


class MatrixInfo(NamedTuple):
  """What a score function may use besides the kernel itself."""
  layer: int
  name: str  # 'mlp/c_fc', ...
  key: Optional[jax.Array]  # PRNG key of the run (random)
  norm: Optional[jax.Array]  # [in] ||X_i|| of the matrix's calibration inputs (wanda)
  options: Optional[dict] = None  # the method's option values (Criterion.options), by name


@dataclasses.dataclass(frozen=True)
class Criterion:
  """A pruning method.

  score: (w [in, out], MatrixInfo) -> scores [in, out]; the lowest-scored weights are pruned.
  per_output: ranks within each output unit (a column of w), so only scope=matrix applies.
  calibration: what it needs from calibration data: '' | 'norms' (input norms) | 'hessian'.
  unit_score: structured methods: (params, layer) -> [units] scores of whole MLP hidden units.
  prune_matrix: methods that rewrite the kept weights: (w, hessian, ratio, nm, options) ->
    (w_new, keep); always calibrated layer by layer on the already pruned layers below.
  options: the method's settings; `options_of(prune config)` gives {name: value} to the
    functions above (MatrixInfo.options for a score).
  nm: supports prune.pattern=N:M (per-output groups of a weight score).
  needs_key: scores from the run's PRNG key (a control), the same key at every GMP update.
  compactable: removes whole MLP units, so the pruned model can be evaluated smaller
    (prune.compact).
  """
  name: str
  score: Optional[Callable] = None
  per_output: bool = False
  calibration: str = ""
  unit_score: Optional[Callable] = None
  prune_matrix: Optional[Callable] = None
  options: tuple[Option, ...] = ()
  nm: bool = True
  needs_key: bool = False
  compactable: bool = False

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
  """{'sparsegpt_damp': Option, ...}: every registered method's options, as keys of prune.*."""
  return {f"{name}_{o.name}": o for name, c in CRITERIA.items() for o in c.options}


def option_defaults() -> dict[str, Any]:
  """{'sparsegpt_damp': 0.01, ...}: the defaults of option_keys(), for configs/base.py."""
  return {k: o.default for k, o in option_keys().items()}


def _with_defaults(crit: Criterion, options: Optional[dict]) -> dict:
  """The method's option values: `options`, else each Option's default."""
  return {o.name: (options or {}).get(o.name, o.default) for o in crit.options}


def options_of(prune) -> dict[str, Any]:
  """{option name: value} of the configured method, from the `prune` config section."""
  method = prune["method"]
  return {o.name: prune[f"{method}_{o.name}"]
          for o in (CRITERIA[method].options if method in CRITERIA else ())}


def wanda_score(w, norm):
  """|W_ij| * ||X_i||: w [in, out], norm [in] -> [in, out] (Sun et al. 2023)."""
  return jnp.abs(w) * norm[:, None]


def _random_score(w, info: MatrixInfo):
  # Keyed by (layer, matrix), not by position among the targets: a matrix gets the same
  # random scores whatever else is pruned, and at every GMP update (so masks nest).
  key = jax.random.fold_in(jax.random.fold_in(info.key, info.layer), MATRICES.index(info.name))
  return jax.random.uniform(key, w.shape)


def _unit_norms(params, layer):
  """Unit k of a layer's MLP: ||c_fc[:, k]|| * ||c_proj[k, :]|| (the weight norms into and out
  of the unit: either side alone ignores half of what the unit does)."""
  mlp = params[f"h_{layer}"]["mlp"]
  return (jnp.linalg.norm(mlp["c_fc"]["kernel"], axis=0)
          * jnp.linalg.norm(mlp["c_proj"]["kernel"], axis=1))


def _sparsegpt_matrix(w, hessian, ratio, nm, options):
  return sparsegpt.sparsegpt_prune(w, hessian, None if nm else ratio, nm=nm,
                                   blocksize=int(options["blocksize"]),
                                   damp=float(options["damp"]))


register(Criterion("magnitude", score=lambda w, info: jnp.abs(w)))
register(Criterion("random", score=_random_score, nm=False, needs_key=True))
register(Criterion("wanda", score=lambda w, info: wanda_score(w, info.norm), per_output=True,
                   calibration="norms"))
register(Criterion("neurons", unit_score=_unit_norms, nm=False, compactable=True))
register(Criterion("sparsegpt", prune_matrix=_sparsegpt_matrix, calibration="hessian",
                   options=sparsegpt.OPTIONS))


# --- masks ------------------------------------------------------------------------------


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
  """Keep-masks (True = kept) for the targeted kernels, exact counts per `scope`.

  Args:
    params: the parameter tree.
    ratios_per_layer: [n_layer] sparsity of each layer's targeted matrices.
    method: none (returns {}) or a registered criterion: magnitude (|w|), random (uniform
      scores from `key`, a control), wanda (|W_ij| * ||X_i||, needs `stats`), neurons (whole MLP
      hidden units, targets mlp only). sparsegpt rewrites weights: use `prune_layer`.
    targets: `prune.targets`.
    scope: where the count is taken. matrix: round(r_l * n) per matrix (magnitude: the same mask
      as torch's l1_unstructured). block: one ranking over all targeted matrices of a block,
      round(sum_l r_l * n_l) zeros. global: one ranking over every targeted matrix, round(S *
      n_total) zeros with S the parameter-weighted mean of ratios_per_layer.
      wanda ranks within each output unit (a column of our [in, out] kernel, a row of torch's
      [out, in] weight) and zeroes round(r * in) per column, so a matrix gets
      out * round(r * in) zeros; it supports scope matrix only.
      neurons zeroes round(r * F) units per layer (or per block / globally with those scopes):
      c_fc kernel column k, c_fc bias k and c_proj kernel row k.
    blocks: `prune.blocks` (scope block).
    key: PRNG key for method random. Pass the same key at every GMP update so masks nest.
    stats: calibration sums (calibration.collect_stats) for wanda.
    previous: an earlier mask tree (gradual pruning): ranking happens among the weights it
      kept (the dead ones count first towards the zeros) and the result is ANDed with it, so
      masks only grow.
    pattern: None, or (n, m): n zeros in every m consecutive inputs of each output unit, in
      layers whose ratio is not 0 (their ratio must be n / m).
    options: the method's option values by name (options_of); missing ones take the default.
  Returns:
    the mask tree: bool leaves shaped like the kernels (plus the c_fc bias for neurons).
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
  norms = input_norms(stats) if crit.calibration == "norms" else {}
  names = target_names(targets)
  options = _with_defaults(crit, options)
  scores = {}
  for l in range(n_layer):
    for n in names:
      s = crit.score(kernel(params, l, n), MatrixInfo(l, n, key, norms.get((l, n)), options))
      if previous is not None:  # dead weights rank first, so they stay among the zeros
        s = jnp.where(trees.get_path(previous, kernel_path(l, n)), s, -jnp.inf)
      scores[(l, n)] = s

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
  """Prunes the targeted matrices of one layer from that layer's own calibration statistics.

  For sequential calibration: `calib` holds the layer's inputs as seen through the already
  pruned layers below it -- {'mlp': {'c_fc_in': sum x^2 [in], ...}} for 'norms' criteria, or
  {'mlp': {'c_fc_in': H [in, in], ...}} for 'hessian' ones. Returns (params with layer `layer`
  pruned, that layer's masks {'h_l': {...}}).
  """
  crit = criterion(method)
  names = target_names(targets)
  masks = {}
  if crit.prune_matrix is None:  # a score criterion: rank this layer alone
    one = {"h_0": params[f"h_{layer}"]}
    stats = {"h_0": calib} if crit.calibration == "norms" else None
    m = compute_masks(one, [ratio], method=method, targets=targets, stats=stats,
                      pattern=pattern, options=options)
    masks = {f"h_{layer}": m["h_0"]}
    return apply_masks(params, masks), masks
  new = jax.tree.map(lambda x: x, params)
  for n in names:
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
  """Calibration sums -> {(layer, 'mlp/c_fc'): ||X_i||_2 [in]} for every matrix.

  Accepts calibration.collect_stats' tree, the raw mutable=['stats'] output (tuples are
  summed), or either wrapped in {'stats': ...}.
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


def layer_scores(method: str, params, stats, targets: str, key=None) -> list[list]:
  """[n_layer][matrix] score arrays of a score criterion (OWL's outlier statistics)."""
  crit = criterion(method)
  norms = input_norms(stats) if crit.calibration == "norms" else {}
  return [[crit.score(kernel(params, l, n),
                      MatrixInfo(l, n, key, norms.get((l, n)), _with_defaults(crit, None)))
           for n in target_names(targets)] for l in range(n_layers(params))]


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
# (README, "Masked training": pruned weights stay exactly 0.0).
mask_gradients = apply_masks


def mask_count(masks) -> tuple[int, int]:
  """(pruned, total) elements over every leaf of a mask tree."""
  leaves = jax.tree.leaves(masks)
  return (int(sum(int(jnp.sum(~m)) for m in leaves)), int(sum(m.size for m in leaves)))


# --- measurement and compaction --------------------------------------------------------


@jax.jit
def _zero_counts(kernels):
  return [jnp.sum(k == 0) for k in kernels]


def measure_sparsity(params, n_layer: int, blocks: int, targets: str) -> dict:
  """Fractions of exact zeros in the kernels (results.json "sparsity").

  Returns {"overall": over the targeted kernels, "per_block": [same, per block],
  "per_layer": [{"layer", "block", "c_fc", "c_proj", "attn_c_attn", "attn_c_proj"}, ...]}.
  Per-layer fields cover all four kernels whatever `targets` is, so a report shows everything:
  c_fc / c_proj are the MLP's, attn_c_attn / attn_c_proj the attention's. Biases are not
  counted (neurons also zeroes c_fc biases, which this leaves out).
  """
  names = target_names(targets)
  keys = [(l, n) for l in range(n_layer) for n in MATRICES]
  counts = jax.device_get(_zero_counts([kernel(params, l, n) for l, n in keys]))  # one call
  zeros = {k: int(c) for k, c in zip(keys, counts)}
  sizes = {(l, n): int(np.prod(kernel(params, l, n).shape)) for l, n in keys}
  frac = lambda ks: sum(zeros[k] for k in ks) / max(sum(sizes[k] for k in ks), 1)

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


# --- exact counts --------------------------------------------------------------------------


def _order_key(x):
  """float32 -> uint32 with the same order (-inf < ... < 0 < ... < inf < NaN; -0 is +0, as in
  a comparison)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_smallest_key(keys, k):
  """The k-th smallest (1-based) of uint32 `keys` along the last axis, [..., 1].

  A bitwise binary search: 32 counting passes, each a compare and a sum, instead of a sort. It
  gives the value a sort would put at position k - 1, and on a CPU (where XLA's sort is one
  thread of comparisons) it is ~10x faster for a GPT-2 matrix; k may be traced.
  """
  def bit(i, t):
    trial = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    # Keep the bit off while fewer than k keys lie below the trial value: the answer is >= it.
    below = jnp.sum(keys < trial, axis=-1, keepdims=True, dtype=jnp.int32)
    return jnp.where(below < k, trial, t)
  start = jnp.zeros(keys.shape[:-1] + (1,), jnp.uint32)
  return jax.lax.fori_loop(0, 32, bit, start)


def _smallest_k(scores, k):
  """bool mask of the k smallest entries along the last axis (ties: the lower index first).

  The k-th smallest value is the threshold; entries below it are taken, and of those equal to it
  only as many as are still needed, so exactly k are marked. k may be traced (one compile
  serves every ratio of a GMP schedule or an allocation search).
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


def _unit_masks(crit, params, ratios, scope, blocks, previous) -> dict:
  """Structured masks for whole MLP hidden units (see compute_masks)."""
  scores = {}
  for l in range(len(ratios)):
    s = crit.unit_score(params, l)  # [F]
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
