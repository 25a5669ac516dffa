"""The course project's grid, done properly: front / middle / back MLP ratios over
{0, .1, .3, .5, .7, .9} (216 runs), magnitude per matrix, one epoch of masked fine-tuning each,
exact perplexity (no padding counted).

    python -m blockprune_jax.main --config=configs/hpml_grid.py --workdir=runs/hpml_grid

A config with get_sweep() runs as a sweep: one workdir per run, finished runs skipped, and a report
(report.md, heatmaps) at the end. Offline (no hub): add
--config.model.init=scratch --config.base.steps=2000 --config.data.source=builtin
to train one dense base from scratch first and prune that. `:coarse` runs {0, .3, .6} (27 runs).
"""
import itertools

from configs import blocks

VALUES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


def get_config():
  c = blocks.get_config()
  c.prune.ratios = (0.0, 0.0, 0.0)
  return c


def get_sweep(arg=None):
  values = (0.0, 0.3, 0.6) if arg == "coarse" else VALUES
  return [{"prune.ratios": r} for r in itertools.product(values, repeat=3)]
