"""PruneGPT's gradual magnitude pruning, done properly: every attention and MLP matrix of every
layer pruned layer-wise (per matrix) to 90 % on a cubic schedule from epoch 1 to 5 of 10, masks
updated every 0.01 epoch, evaluated on the validation split in non-overlapping 1024-token blocks.

    python -m blockprune_jax.main --config=configs/prunegpt_gmp90.py --workdir=runs/gmp90

prune.start / end / every are fractions of the whole run (10 epochs): 0.1 = epoch 1.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.prune.method = "magnitude"
  c.prune.targets = "all"
  c.prune.allocation = "uniform"
  c.prune.target = 0.9
  c.prune.scope = "matrix"
  c.prune.schedule = "gradual"
  c.prune.start = 0.1
  c.prune.end = 0.5
  c.prune.every = 0.001
  c.train.epochs = 10.0
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 100
  c.train.eval_every = 500
  c.eval.splits = ("validation",)
  c.eval.stride = 0  # = seq_len: non-overlapping 1024-token blocks, as PruneGPT reported
  c.checkpoint.every_steps = 500
  return c
