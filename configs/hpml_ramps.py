"""The course project's ramps at equal mean sparsity, done properly: linear [.1,.2,.3] vs
exponential [.1,.18,.32] (mean .2) and linear [.1,.3,.5] vs exponential [.1,.237,.563]
(mean .3), front / middle / back MLP ratios, magnitude per matrix, one epoch of masked
fine-tuning, three seeds each; the report gives mean +- std over seeds.

    python -m blockprune_jax.main --config=configs/hpml_ramps.py --workdir=runs/hpml_ramps

Offline: add --config.model.init=scratch --config.base.steps=2000 --config.data.source=builtin.
`:seeds=5` changes the number of seeds.
"""
from configs import blocks

RAMPS = {
    "linear_mean.2": (0.1, 0.2, 0.3),
    "exponential_mean.2": (0.1, 0.18, 0.32),
    "linear_mean.3": (0.1, 0.3, 0.5),
    "exponential_mean.3": (0.1, 0.237, 0.563),
}


def get_config():
  return blocks.get_config()


def get_sweep(arg=None):
  seeds = int(arg.split("=")[1]) if arg and arg.startswith("seeds=") else 3
  return [{"prune.ratios": ratios, "seed": s} for ratios in RAMPS.values() for s in range(seeds)]
