"""The pruning plan of one run: which ratio for which layer, how, and when masks are computed.

Glue between the `prune.*` config keys and the pure functions of `allocation`, `pruning`,
`calibration` and `gmp`. `make_plan` always returns a Plan; with `prune.method=none` it is the
no-op plan (prunes nothing, reports zeros), so callers never branch on the method.
"""
import jax
import ml_collections
import numpy as np

from blockprune_jax import allocation
from blockprune_jax import calibration
from blockprune_jax import gmp
from blockprune_jax import parallel
from blockprune_jax import pruning
from blockprune_jax import solve

SCHEDULES = ("oneshot", "gradual")


class Plan:
  """Ratios per block / layer for this model, and how to prune with them."""

  active = True

  def __init__(self, config, model_cfg, params, streams, log):
    self.p = p = config.prune
    self.model_cfg = model_cfg
    self.key = jax.random.PRNGKey(config.seed + 2)  # random pruning: same key every GMP update
    self.sizes = pruning.targeted_sizes(params, p.targets)
    self.pattern = pruning.parse_pattern(p.pattern)
    self.criterion = pruning.criterion(p.method)
    self.sequential = self.criterion.sequential_only or bool(p.sequential)
    # Impossible combinations (sequential without data, one-shot methods on a schedule, free
    # ratios with N:M) were refused by validate.py before any work started.
    measured = p.allocation in allocation.MEASURED
    needs_data = self.criterion.calibration or p.allocation in ("owl", "search")
    self.calib_seqs = calibration.calibration_sequences(config, streams) if needs_data else None
    self.stats = None
    if ((self.criterion.calibration == "norms" and not self.sequential)
        or p.allocation in ("owl", "search")):
      self.stats = calibration.collect_stats(model_cfg, params,
                                             [s[None] for s in self.calib_seqs])
    self.block_layers = allocation.block_layers(len(self.sizes), int(p.blocks))
    self.measured = {}
    if measured:
      per_block = self._measure_allocation(config, params, streams, log)
      per_layer = allocation.expand_to_layers(per_block, self.block_layers)
    else:
      per_layer, per_block = allocation.allocate(p, self.sizes, self._outliers(params))
    self.ratios_per_block = [float(r) for r in per_block]
    self.ratios_per_layer = [float(r) for r in per_layer]
    self.target = float(np.average(self.ratios_per_layer, weights=self.sizes))
    pruning.check_method(p.method, targets=p.targets, scope=p.scope, pattern=self.pattern,
                         ratios=self.ratios_per_layer)
    log.event("plan", f"prune {p.method} {p.targets} ({p.allocation}, {p.schedule}"
              f"{', ' + p.pattern if self.pattern else ''}): ratios per block "
              f"{[round(r, 4) for r in self.ratios_per_block]}", **self.describe())

  def _outliers(self, params):
    """OWL's per-layer outlier ratios (None unless some allocation needs them)."""
    if self.stats is None or self.p.allocation not in ("owl", "search"):
      return None
    scores = pruning.layer_scores("wanda", params, self.stats, self.p.targets)
    return allocation.outlier_ratios(scores, float(self.p.owl_threshold))

  def _measure_allocation(self, config, params, streams, log) -> list[float]:
    """Per-block ratios measured on this model with this run's own criterion.

    sensitivity: the calibration-loss increase when one block alone is pruned at each of
    prune.sensitivity_ratios, then the exact solve of solve.solve_sensitivity, refined by
    trust-region rounds around it (solve.measure_sensitivity). search: that
    solution and the generated allocations are the starts of solve.search_allocation, which
    scores candidates by calibration loss (no fine-tuning) in prune.search_evals calls. The
    loss is taken on calibration sequences other than those the criteria's statistics use.
    """
    p = self.p
    blocks, target = self.block_layers, float(p.target)
    block_sizes = [sum(self.sizes[l] for l in b) for b in blocks]
    seqs = calibration.calibration_sequences(config, streams, purpose=8, with_labels=True)
    loss = calibration.loss_function(self.model_cfg, seqs, parallel.data_mesh(),
                                     config.eval.batch_size)

    def pruned_loss(block_ratios):
      pruned, _ = self.prune(params, allocation.expand_to_layers(block_ratios, blocks))
      return loss(pruned)
    found = solve.measure_sensitivity(pruned_loss, p.sensitivity_ratios, block_sizes, target,
                                      int(p.sensitivity_rounds))
    ratios, base = found["ratios"], found["base_loss"]
    self.measured["sensitivity"] = found
    log.event("sensitivity", f"sensitivity: loss {found['loss']:.4f} after {found['evals']} "
              f"calibration evaluations; ratios {[round(r, 4) for r in ratios]}",
              evals=found["evals"], loss=found["loss"])
    if p.allocation == "search":
      starts = {"sensitivity": ratios}
      outliers = self._outliers(params)
      for kind in ("uniform", "linear", "exponential", "owl"):
        q = ml_collections.ConfigDict(p.to_dict())
        q.allocation = kind
        starts[kind] = allocation.allocate(q, self.sizes, outliers)[1]
      found = solve.search_allocation(pruned_loss, starts, block_sizes, target,
                                      int(p.search_evals), seed=config.seed)
      ratios = [float(r) for r in found["ratios"]]
      self.measured["search"] = {
          "evals": len(found["history"]), "score": found["score"], "base_loss": base,
          "best_start": found["start_name"], "start_scores": found["start_scores"],
          "ratios": ratios}
      log.event("search", f"search: loss {found['score']:.4f} (best start {found['start_name']} "
                f"{min(found['start_scores'].values()):.4f}); ratios "
                f"{[round(r, 4) for r in ratios]}", **self.measured["search"])
    return ratios

  def prune(self, params, ratios_per_layer, old_masks=None):
    """(params with the pruned weights at 0.0, keep-masks). Masks only grow from old_masks."""
    p = self.p
    if self.sequential:
      collection = "hessian" if self.criterion.calibration == "hessian" else "stats"
      options = {"damp": p.sparsegpt_damp, "blocksize": p.sparsegpt_blocksize}

      def prune_layer(params, layer, calib):
        return pruning.prune_layer(params, layer, ratios_per_layer[layer], calib,
                                   method=p.method, targets=p.targets, pattern=self.pattern,
                                   options=options)
      return calibration.sequential_prune(self.model_cfg, params, self.calib_seqs,
                                          collection=collection, prune_layer=prune_layer)
    masks = pruning.compute_masks(
        params, ratios_per_layer, method=p.method, targets=p.targets, scope=p.scope,
        blocks=p.blocks, key=self.key, stats=self.stats, previous=old_masks or None,
        pattern=self.pattern)
    return pruning.apply_masks(params, masks), masks

  def full_masks(self, params):
    """All-True masks of the final structure (gradual runs start from these)."""
    return pruning.compute_masks(params, [0.0] * len(self.sizes), method=self.p.method,
                                 targets=self.p.targets, scope="matrix", blocks=self.p.blocks,
                                 key=self.key, stats=self.stats)

  # --- gradual magnitude pruning, in steps ----------------------------------------------

  def gmp_update(self, step, total) -> bool:
    start, end, every = gmp.schedule_steps(self.p, total)
    return gmp.is_gmp_update_step(step, start=start, end=end, every=every)

  def gmp_ratios(self, step, total):
    start, end, _ = gmp.schedule_steps(self.p, total)
    s = gmp.gmp_sparsity(step, s_init=float(self.p.initial), s_final=self.target,
                         start=start, end=end)
    return gmp.scale_ratios(self.ratios_per_layer, s, self.sizes)

  def describe(self) -> dict:
    """The results.json "pruning" section."""
    p = self.p
    d = {"method": p.method, "targets": p.targets, "allocation": p.allocation,
         "scope": p.scope, "schedule": p.schedule, "target": self.target,
         "pattern": p.pattern, "sequential": self.sequential,
         "block_layers": self.block_layers, "ratios_per_block": self.ratios_per_block,
         "ratios_per_layer": self.ratios_per_layer}
    if self.criterion.calibration:
      d["calib_batches"] = int(len(self.calib_seqs))
    d.update(self.measured)
    if p.method == "sparsegpt":
      d.update(sparsegpt_damp=float(p.sparsegpt_damp),
               sparsegpt_blocksize=int(p.sparsegpt_blocksize))
    return d


class NoPlan:
  """prune.method=none: prunes nothing; results.json still gets the same fields."""

  active = False

  def __init__(self, config, model_cfg):
    n = model_cfg.n_layer
    blocks = max(1, min(config.prune.blocks, n))  # nothing validated prune.blocks: what fits
    self.block_layers = allocation.block_layers(n, blocks)
    self.targets = config.prune.targets
    self.ratios_per_layer = [0.0] * n

  def prune(self, params, ratios_per_layer, old_masks=None):
    del ratios_per_layer, old_masks
    return params, {}

  def describe(self) -> dict:
    return {"method": "none", "targets": self.targets, "allocation": None, "scope": None,
            "schedule": None, "target": 0.0, "pattern": None, "sequential": False,
            "block_layers": self.block_layers,
            "ratios_per_block": [0.0] * len(self.block_layers),
            "ratios_per_layer": self.ratios_per_layer}


def make_plan(config, model_cfg, params, streams, log):
  """The run's Plan (NoPlan when prune.method is none)."""
  if config.prune.method == "none":
    return NoPlan(config, model_cfg)
  return Plan(config, model_cfg, params, streams, log)


def measure(params, model_cfg, plan) -> dict:
  """The results.json "sparsity" section, counted from the final parameters."""
  return pruning.measure_sparsity(jax.device_get(params), model_cfg.n_layer,
                                  len(plan.block_layers),
                                  plan.p.targets if plan.active else plan.targets)
