"""Explicit MLP ratios per block (front, middle, back), magnitude per matrix, one epoch of masked
fine-tuning.

    python -m blockprune_jax.main --config=configs/blocks.py --workdir=runs/blocks \
        --config.prune.ratios=0.1,0.3,0.5
    python -m blockprune_jax.sweep --config=configs/blocks.py --workdir=runs/grid \
        --sweep=prune.ratios=0,0.3,0.6:0,0.3,0.6:0,0.3,0.6
"""
from configs import _pruned


def get_config():
  c = _pruned.get_config()
  c.prune.allocation = "explicit"
  c.prune.ratios = (0.1, 0.3, 0.5)
  return c
