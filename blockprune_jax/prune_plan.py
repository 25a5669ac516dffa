"""The pruning plan of one run: which ratio for which layer, and when masks are (re)computed.

Glue between the `prune.*` config keys and the pure functions of `pruning` / `allocation`:
calibration for wanda / owl, the allocation, one-shot pruning and the GMP schedule in steps.
"""
import jax
import numpy as np

from blockprune_jax import pruning
from blockprune_jax.errors import UserError


class Plan:
  """Ratios per block / layer for this model, and how to prune with them."""

  def __init__(self, config, model_cfg, params, streams, log):
    self.p = config.prune
    self.seed = config.seed
    self.key = jax.random.PRNGKey(config.seed + 2)  # random pruning: same key every GMP update
    self.sizes = pruning.targeted_sizes(params, self.p.targets)
    self.stats = None
    if self.p.method == "wanda" or self.p.allocation == "owl":
      self.stats = calibration_stats(config, model_cfg, params, streams)
    d = pruning.pruning_plan(self.p, params, self.stats)
    self.block_layers = d["block_layers"]
    self.ratios_per_block = [float(r) for r in d["ratios_per_block"]]
    self.ratios_per_layer = [float(r) for r in d["ratios_per_layer"]]
    self.target = float(np.average(self.ratios_per_layer, weights=self.sizes))
    log.event("plan", f"prune {self.p.method} {self.p.targets} ({self.p.allocation}, "
              f"{self.p.schedule}): ratios per block "
              f"{[round(r, 4) for r in self.ratios_per_block]}", **self.describe())

  def prune(self, params, ratios_per_layer, old_masks=None):
    """(params with the pruned weights at 0.0, keep-masks). Masks only grow from old_masks."""
    masks = pruning.compute_masks(
        params, ratios_per_layer, method=self.p.method, targets=self.p.targets,
        scope=self.p.scope, blocks=self.p.blocks, key=self.key, stats=self.stats,
        previous=old_masks or None)
    return pruning.apply_masks(params, masks), masks

  def full_masks(self, params):
    """All-True masks of the final structure (gradual runs start from these)."""
    return pruning.compute_masks(params, [0.0] * len(self.sizes), method=self.p.method,
                                 targets=self.p.targets, scope="matrix", blocks=self.p.blocks,
                                 key=self.key, stats=self.stats)

  # --- gradual magnitude pruning (Zhu & Gupta 2017), in steps -------------------------

  def _steps(self, total):
    """prune.start / end / every as step counts: fractions of the run if <= 1, else steps."""
    conv = lambda x: int(round(x * total)) if x <= 1 else int(x)
    start, end, every = conv(self.p.start), conv(self.p.end), max(1, conv(self.p.every))
    if not 0 <= start <= end:
      raise UserError(f"prune.start={self.p.start} must not come after prune.end={self.p.end}")
    # Masks are updated before steps 0 .. total-1: an end at (or past) the last step means the
    # final sparsity is reached before the last update, as the schedule promises.
    end = min(end, total - 1)
    return min(start, end), end, every

  def gmp_update(self, step, total) -> bool:
    start, end, every = self._steps(total)
    return pruning.is_gmp_update_step(step, start=start, end=end, every=every)

  def gmp_ratios(self, step, total):
    start, end, _ = self._steps(total)
    s = pruning.gmp_sparsity(step, s_init=float(self.p.initial), s_final=self.target,
                             start=start, end=end)
    return pruning.scale_ratios(self.ratios_per_layer, s, self.sizes)

  def describe(self) -> dict:
    """The results.json "pruning" section."""
    return {"method": self.p.method, "targets": self.p.targets,
            "allocation": self.p.allocation, "scope": self.p.scope,
            "schedule": self.p.schedule, "target": self.target,
            "block_layers": self.block_layers, "ratios_per_block": self.ratios_per_block,
            "ratios_per_layer": self.ratios_per_layer}


def make_plan(config, model_cfg, params, streams, log):
  """A Plan, or None when prune.method is none."""
  if config.prune.method == "none":
    return None
  return Plan(config, model_cfg, params, streams, log)


def calibration_stats(config, model_cfg, params, streams):
  """Activation sums for wanda / owl from `prune.calib_batches` train sequences, picked by seed."""
  from blockprune_jax import train  # pylint: disable=import-outside-toplevel
  seqs = train.train_sequences(streams.get("train"), config.data.seq_len)
  n = min(config.prune.calib_batches, len(seqs))
  if n < 1:
    raise UserError("prune.calib_batches must be >= 1 and the train split must hold a sequence")
  pick = np.random.default_rng([config.seed, 7]).choice(len(seqs), n, replace=False)
  return pruning.collect_stats(model_cfg, params, [seqs[i:i + 1, :-1] for i in sorted(pick)])


def describe_none(config, model_cfg) -> dict:
  """The results.json "pruning" section of a run that prunes nothing."""
  from blockprune_jax import allocation  # pylint: disable=import-outside-toplevel
  n = model_cfg.n_layer
  return {"method": "none", "targets": config.prune.targets, "allocation": None,
          "scope": None, "schedule": None, "target": 0.0,
          "block_layers": allocation.block_layers(n, max(1, min(config.prune.blocks, n))),
          "ratios_per_block": [0.0] * max(1, min(config.prune.blocks, n)),
          "ratios_per_layer": [0.0] * n}


def measure(params, model_cfg, config) -> dict:
  """The results.json "sparsity" section, counted from the final parameters."""
  blocks = config.prune.blocks
  if config.prune.method == "none":  # no plan validated prune.blocks: report what fits
    blocks = max(1, min(blocks, model_cfg.n_layer))
  return pruning.measure_sparsity(jax.device_get(params), model_cfg.n_layer, blocks,
                                  config.prune.targets)
