"""The pruning plan of one run: which ratio for which layer, how, and when masks are computed.

Glue between the `prune.*` keys and the pure functions of `allocation`, `pruning`,
`calibration` and `gmp`. A Plan holds values only; with `prune.method=none` it is the no-op
plan (prunes nothing, reports zeros), so callers never branch on the method.
"""
import dataclasses
import json

import jax
import ml_collections
import numpy as np

from blockprune_jax.prune import allocation
from blockprune_jax import files
from blockprune_jax.prune import calibration
from blockprune_jax.prune import gmp
from blockprune_jax import parallel
from blockprune_jax.prune import pruning

SCHEDULES = ("oneshot", "gradual")


@dataclasses.dataclass
class Plan:
  """Ratios per block / layer for this model and how to prune with them (`compute`, `none`)."""
  p: ml_collections.ConfigDict  # the run's prune.* keys
  model_cfg: object
  block_layers: list  # layer indices of each block
  ratios_per_block: list
  ratios_per_layer: list
  active: bool = True  # False: a no-op plan (prune.method=none, or not yet: after_finetune)
  sizes: list = ()  # parameters of each layer's targeted matrices
  criterion: object = None  # pruning.criterion(p.method)
  pattern: object = None  # pruning.parse_pattern(p.pattern): N:M or None
  sequential: bool = False  # layer by layer on the pruned model's activations
  calib_seqs: object = None  # calibration sequences, when the criterion or allocation needs data
  stats: object = None  # calibration statistics (activation norms) for the criteria / OWL
  key: object = None  # random pruning: the same key at every GMP update
  measured: dict = dataclasses.field(default_factory=dict)  # sensitivity / search details

  @property
  def target(self) -> float:  # the parameter-weighted mean ratio
    return float(np.average(self.ratios_per_layer, weights=self.sizes)) if self.active else 0.0

  @property
  def gradual(self) -> bool:  # masks change while training
    return self.active and self.p.schedule == "gradual"

  def prune(self, params, ratios_per_layer, old_masks=None):
    """(params with the pruned weights at 0.0, keep-masks). Masks only grow from old_masks."""
    if not self.active:
      return params, {}
    p = self.p
    if self.sequential:
      collection = "hessian" if self.criterion.calibration == "hessian" else "stats"
      options = pruning.options_of(p)

      def prune_layer(params, layer, calib):
        return pruning.prune_layer(params, layer, ratios_per_layer[layer], calib,
                                   method=p.method, targets=p.targets, pattern=self.pattern,
                                   options=options)
      return calibration.sequential_prune(self.model_cfg, params, self.calib_seqs,
                                          collection=collection, prune_layer=prune_layer)
    masks = pruning.compute_masks(
        params, ratios_per_layer, method=p.method, targets=p.targets, scope=p.scope,
        blocks=p.blocks, key=self.key, stats=self.stats, previous=old_masks or None,
        pattern=self.pattern, options=pruning.options_of(p))
    return pruning.apply_masks(params, masks), masks

  def full_masks(self, params):
    """All-True masks of the final structure (gradual runs start from these)."""
    return pruning.compute_masks(params, [0.0] * len(self.sizes), method=self.p.method,
                                 targets=self.p.targets, scope="matrix", blocks=self.p.blocks,
                                 key=self.key, stats=self.stats)

  # --- gradual magnitude pruning, in steps ----------------------------------------------

  def gmp_update(self, step, total) -> bool:
    """Whether masks are recomputed before `step` (never unless gradual)."""
    if not self.gradual:
      return False
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
    if not self.active:
      return {"method": "none", "targets": p.targets, "allocation": None, "scope": None,
              "schedule": None, "target": 0.0, "pattern": None, "sequential": False,
              "block_layers": self.block_layers,
              "ratios_per_block": [0.0] * len(self.block_layers),
              "ratios_per_layer": self.ratios_per_layer}
    d = {"method": p.method, "targets": p.targets, "allocation": p.allocation,
         "scope": p.scope, "schedule": p.schedule, "target": self.target,
         "pattern": p.pattern, "sequential": self.sequential,
         "block_layers": self.block_layers, "ratios_per_block": self.ratios_per_block,
         "ratios_per_layer": self.ratios_per_layer}
    if self.criterion.calibration:
      d["calib_batches"] = int(len(self.calib_seqs))
    d.update(self.measured)
    d.update({f"{p.method}_{k}": v for k, v in pruning.options_of(p).items()})
    return d


def none(config, model_cfg) -> Plan:
  """The no-op plan: prunes nothing; results.json still gets the same fields."""
  n = model_cfg.n_layer
  blocks = max(1, min(config.prune.blocks, n))  # nothing validated prune.blocks: what fits
  return Plan(p=config.prune, model_cfg=model_cfg, block_layers=allocation.block_layers(n, blocks),
              ratios_per_block=[0.0] * blocks, ratios_per_layer=[0.0] * n, active=False)


def compute(config, model_cfg, params, streams, log, stored=None) -> Plan:
  """The run's plan: calibration data and statistics where the criterion or the allocation needs
  them, then the ratios (allocation.ALLOCATIONS); logged. The no-op plan for prune.method=none.

  stored: a measured allocation kept with this run's checkpoint (`stored_allocation`), reused on
  resume instead of measuring again."""
  p = config.prune
  if p.method == "none":
    return none(config, model_cfg)
  sizes = pruning.targeted_sizes(params, p.targets)
  criterion = pruning.criterion(p.method)
  alloc = allocation.get(p.allocation)
  sequential = criterion.sequential_only or bool(p.sequential)
  # Impossible combinations (sequential without data, one-shot methods on a schedule, free
  # ratios with N:M) were refused by validate.py before any work started.
  needs_data = criterion.calibration or alloc.outliers
  calib_seqs = calibration.calibration_sequences(config, streams) if needs_data else None
  stats = None
  if (criterion.calibration == "norms" and not sequential) or alloc.outliers:
    stats = calibration.collect_stats(model_cfg, params, [s[None] for s in calib_seqs])
  blocks = allocation.block_layers(len(sizes), int(p.blocks))
  plan = Plan(p=p, model_cfg=model_cfg, block_layers=blocks, ratios_per_block=[],
              ratios_per_layer=[], sizes=sizes, criterion=criterion,
              pattern=pruning.parse_pattern(p.pattern), sequential=sequential,
              calib_seqs=calib_seqs, stats=stats, key=jax.random.PRNGKey(config.seed + 2))
  if alloc.measured and stored:
    per_block = stored["ratios_per_block"]
    found = allocation.Ratios(allocation.expand_to_layers(per_block, plan.block_layers),
                              per_block, dict(stored["measured"]))
    log.event("allocation", "reusing the measured allocation stored with the checkpoint",
              reused=True)
  else:
    outliers = None
    if alloc.outliers:
      scores = pruning.layer_scores("wanda", params, stats, p.targets)
      outliers = allocation.outlier_ratios(scores, float(p.owl_threshold))
    loss = _pruned_loss(plan, config, params, streams) if alloc.measured else None
    found = alloc.ratios(allocation.Inputs(p, sizes, outliers, loss, seed=config.seed,
                                           event=log.event))
  plan = dataclasses.replace(plan, ratios_per_block=[float(r) for r in found.per_block],
                             ratios_per_layer=[float(r) for r in found.per_layer],
                             measured=found.measured)
  pruning.check_method(p.method, targets=p.targets, scope=p.scope, pattern=plan.pattern,
                       ratios=plan.ratios_per_layer)
  log.event("plan", f"prune {p.method} {p.targets} ({p.allocation}, {p.schedule}"
            f"{', ' + p.pattern if plan.pattern else ''}): ratios per block "
            f"{[round(r, 4) for r in plan.ratios_per_block]}", **plan.describe())
  return plan


def _pruned_loss(plan: Plan, config, params, streams):
  """block ratios -> calibration loss of params pruned with this plan's own criterion, on
  sequences other than those the criteria's statistics use."""
  seqs = calibration.calibration_sequences(config, streams, calibration.SCORE, with_labels=True)
  loss = calibration.loss_function(plan.model_cfg, seqs, parallel.data_mesh(),
                                   config.eval.batch_size)

  def pruned_loss(block_ratios):
    pruned, _ = plan.prune(params, allocation.expand_to_layers(block_ratios, plan.block_layers))
    return loss(pruned)
  return pruned_loss


def stored_allocation(plan: Plan) -> dict | None:
  """What a checkpoint keeps of a measured allocation, so that a resumed run need not measure
  again (compute's `stored`); None for the other allocations, which cost nothing to redo."""
  if not plan.active or not allocation.get(plan.p.allocation).measured:
    return None
  stored = {"ratios_per_block": list(plan.ratios_per_block), "measured": plan.measured}
  return json.loads(json.dumps(stored, default=files.to_jsonable))  # Orbax's JSON: no numpy


def measure(params, model_cfg, plan) -> dict:
  """The results.json "sparsity" section, counted from the final parameters."""
  return pruning.sparsity(jax.device_get(params), model_cfg.n_layer,
                                  len(plan.block_layers), plan.p.targets)
