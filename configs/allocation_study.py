"""The allocation study: how much should each block of GPT-2 be pruned? Measured, with fair
controls and error bars.

    python -m blockprune_jax.main --config=configs/allocation_study.py --workdir=runs/alloc_study

Prunes the MLPs of GPT-2 (WikiText-2) by magnitude to an overall sparsity of 0.3, 0.5 and 0.7
with each allocation over front / middle / back blocks -- uniform, linear (growing and
shrinking front to back), exponential, OWL, sensitivity (solved from measured per-block loss
curves) and search (a budgeted search scored by calibration loss) -- then fine-tunes each for
one epoch with the masks held, three seeds each. The sweep adds the dense model fine-tuned the
same way (the control); the report gives one-shot and fine-tuned perplexity, the change against
the control, mean +- std over seeds, and per sparsity the paired differences between
allocations with 95 % intervals and one sentence on which wins.

Variants (`--config=configs/allocation_study.py:ARG`, comma-separated): `layers` (one block per
layer), `seeds=5`, `targets=0.5,0.8`, `offline` (the quickstart's small byte-level model trained
on the builtin corpus, 20 fine-tuning steps; add --config.base.dir=runs/quickstart/base to reuse a
quickstart's base model).
"""
from configs import _pruned
from configs import quickstart

ALLOCATIONS = (
    {"prune.allocation": "uniform"},
    {"prune.allocation": "linear"},
    {"prune.allocation": "linear", "prune.direction": "decreasing"},
    {"prune.allocation": "exponential"},
    {"prune.allocation": "owl"},
    {"prune.allocation": "sensitivity"},
    {"prune.allocation": "search"},
)


def _args(arg):
  """'layers,seeds=5,targets=0.5,0.8' -> {'layers': True, 'seeds': '5', 'targets': '0.5,0.8'}."""
  out, key = {}, None
  for part in (arg or "").split(","):
    if "=" in part:
      key, value = part.split("=", 1)
      out[key] = value
    elif part and key == "targets" and part[0].isdigit():
      out[key] += "," + part
    elif part:
      out[part], key = True, None
  return out


def get_config(arg=None):
  if _args(arg).get("offline"):
    c = quickstart.get_config()
    c.train.steps = 20
  else:
    c = _pruned.get_config()
    c.prune.calib_batches = 32
  if _args(arg).get("layers"):
    c.prune.blocks = c.model.n_layer
  return c


def get_sweep(arg=None):
  args = _args(arg)
  seeds = range(int(args.get("seeds", 3)))
  targets = [float(t) for t in str(args.get("targets", "0.3,0.5,0.7")).split(",")]
  return [{**alloc, "prune.target": t, "seed": s}
          for t in targets for alloc in ALLOCATIONS for s in seeds]
