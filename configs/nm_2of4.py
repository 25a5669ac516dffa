"""2:4 semi-structured sparsity in the back third only: two zeros in every four consecutive
input weights of each output unit (the layout NVIDIA's sparse tensor cores accept), front and
middle blocks dense, then one epoch of masked fine-tuning (which keeps the pattern).

    python -m blockprune_jax.main --config=configs/nm_2of4.py --workdir=runs/nm_2of4

`--config.prune.method=magnitude|wanda|sparsegpt`; every block's ratio must be 0 or N/M, so
`--config.prune.ratios=0.5,0.5,0.5` prunes everything 2:4.
"""
from configs import _pruned


def get_config():
  c = _pruned.get_config()
  c.prune.method = "wanda"
  c.prune.pattern = "2:4"
  c.prune.allocation = "explicit"
  c.prune.ratios = (0.0, 0.0, 0.5)
  c.prune.calib_batches = 128
  return c
