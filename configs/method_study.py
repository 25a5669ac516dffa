"""Which criterion, and which pattern: magnitude, Wanda and SparseGPT at 50 % unstructured and
2:4, on the MLPs only and on every matrix, one-shot and after masked fine-tuning.

    python -m blockprune_jax.main --config=configs/method_study.py --workdir=runs/method_study

GPT-2 on WikiText-2 (128 calibration sequences of 1024 tokens, one epoch of fine-tuning). The
offline variant runs the same grid on the quickstart's small byte-level model trained on the
builtin corpus (16 calibration sequences, 20 fine-tuning steps); with --config.base.dir pointing
at a quickstart's base it reuses that model:

    python -m blockprune_jax.main --config=configs/method_study.py:offline \
        --workdir=runs/method_study --config.base.dir=runs/quickstart/base
"""
from configs import base
from configs import quickstart


def get_config(arg=None):
  if arg == "offline":
    c = quickstart.get_config()
    c.eval.splits = ("validation", "test")
    c.train.steps = 20
  else:
    c = base.get_config()
    c.prune.calib_batches = 128
    c.train.epochs = 1.0
    c.train.warmup_steps = 50
  c.prune.allocation = "uniform"
  c.prune.target = 0.5
  c.prune.blocks = 3
  return c


def get_sweep(arg=None):
  del arg
  no_finetuning = {"train.steps": 0, "train.epochs": 0.0}
  return [{"prune.method": method, "prune.targets": targets, "prune.pattern": pattern, **tune}
          for targets in ("mlp", "all") for pattern in ("unstructured", "2:4")
          for method in ("magnitude", "wanda", "sparsegpt") for tune in (no_finetuning, {})]
