"""Shared by the pruning configs: GPT-2 MLPs pruned by magnitude, then one epoch of masked
fine-tuning on WikiText-2, then validation / test perplexity."""
from configs import base


def get_config():
  c = base.get_config()
  c.prune.method = "magnitude"
  c.prune.targets = "mlp"
  c.prune.blocks = 3
  c.prune.scope = "matrix"
  c.prune.schedule = "oneshot"
  c.prune.target = 0.5
  c.train.epochs = 1.0
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 50
  c.checkpoint.every_steps = 200
  return c
