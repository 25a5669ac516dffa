"""SparseGPT (Frantar & Alistarh 2023): second-order one-shot pruning that also reconstructs the
kept weights, layer by layer on the outputs of the already pruned layers below.

    python -m blockprune_jax.main --config=configs/sparsegpt.py --workdir=runs/sparsegpt

GPT-2's MLP and attention matrices at 50 % (uniform), 128 calibration sequences of 1024 tokens
from the WikiText-2 train split, no fine-tuning. `--config.prune.pattern=2:4` for the
semi-structured pattern sparse tensor cores run (see configs/nm_2of4.py); `--config.train.epochs=1`
adds masked fine-tuning. The method's own settings (prune.sparsegpt_damp = 0.01,
prune.sparsegpt_blocksize = 128) keep the defaults of the reference code.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.prune.method = "sparsegpt"
  c.prune.targets = "all"
  c.prune.allocation = "uniform"
  c.prune.target = 0.5
  c.prune.calib_batches = 128
  return c
