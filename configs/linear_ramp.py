"""Front / middle / back MLP ratios growing linearly (back minus front = prune.spread) at an
overall sparsity prune.target, magnitude per matrix, one epoch of masked fine-tuning.

    python -m blockprune_jax.main --config=configs/linear_ramp.py --workdir=runs/linear_ramp \
        --config.prune.target=0.5 --config.prune.spread=0.2
"""
from configs import _pruned


def get_config():
  c = _pruned.get_config()
  c.prune.allocation = "linear"
  c.prune.spread = 0.2
  return c
