"""Every MLP matrix pruned to the same ratio prune.target by magnitude, then one epoch of masked
fine-tuning: the baseline the ramps are compared against.

    python -m blockprune_jax.main --config=configs/uniform.py --workdir=runs/uniform \
        --config.prune.target=0.5
"""
from configs import _pruned


def get_config():
  c = _pruned.get_config()
  c.prune.allocation = "uniform"
  return c
