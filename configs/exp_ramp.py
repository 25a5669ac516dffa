"""Front / middle / back MLP ratios growing exponentially (constant factor prune.growth) at an
overall sparsity prune.target, magnitude per matrix, one epoch of masked fine-tuning.

    python -m blockprune_jax.main --config=configs/exp_ramp.py --workdir=runs/exp_ramp \
        --config.prune.target=0.5 --config.prune.growth=1.5
"""
from configs import _pruned


def get_config():
  c = _pruned.get_config()
  c.prune.allocation = "exponential"
  c.prune.growth = 1.5
  return c
