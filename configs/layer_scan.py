"""PruneGPT's scan, done properly: one layer at a time pruned to 80 % (all its attention and MLP
matrices, magnitude per matrix), one epoch of masked fine-tuning, plus the unpruned baseline;
the report draws perplexity per layer.

    python -m blockprune_jax.main --config=configs/layer_scan.py --workdir=runs/layer_scan

For a model with another depth pass it: --config=configs/layer_scan.py:6 (6 layers).
"""
from configs import base

RATIO = 0.8


def get_config(arg=None):
  n_layer = int(arg) if arg else 12
  c = base.get_config()
  c.model.n_layer = n_layer
  c.prune.method = "magnitude"
  c.prune.targets = "all"
  c.prune.allocation = "layer"
  c.prune.ratios = (0.0,) * n_layer
  c.train.epochs = 1.0
  c.train.warmup_steps = 50
  c.checkpoint.every_steps = 200
  return c


def get_sweep(arg=None):
  n_layer = int(arg) if arg else 12
  runs = [{"prune.ratios": (0.0,) * n_layer}]  # the unpruned, fine-tuned baseline
  for layer in range(n_layer):
    runs.append({"prune.ratios": tuple(RATIO if i == layer else 0.0 for i in range(n_layer))})
  return runs
