"""Offline quickstart: the allocation study in miniature on a CPU, in about two minutes.

    python -m blockprune_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Trains a small GPT-2-shaped model (6 layers x 128, byte-level vocabulary) from scratch on the
builtin corpus (text shipped with Python) and exports it in Hugging Face format
(runs/quickstart/base/export). Then prunes 80 % of its MLP weights with three front / middle /
back allocations -- uniform, linear (growing front to back) and sensitivity (solved from loss
curves measured on this model) -- evaluates each right after pruning (one-shot), fine-tunes it
for 10 steps with the masks held, and evaluates validation perplexity again; three seeds each, plus the dense model
fine-tuned the same way (the control). report.md gives mean +- std over seeds, the change
against the control, and the paired differences between allocations with 95 % intervals.
Running it again reuses what is done.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model.init = "scratch"
  c.model.n_layer = 6
  c.model.n_embd = 128
  c.model.n_head = 4
  c.model.n_positions = 128
  c.model.dropout = 0.0
  c.data.source = "builtin"
  c.data.seq_len = 128
  # One token per byte: a 257-row LM head instead of GPT-2's 50257 keeps a CPU run in minutes.
  c.data.tokenizer = "bytes"
  c.eval.splits = ("validation",)
  c.eval.batch_size = 16
  c.base.steps = 200
  c.base.learning_rate = 2e-3
  c.train.batch_size = 16
  c.train.steps = 10
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 4
  c.train.log_every = 5
  c.checkpoint.every_steps = 100
  c.prune.method = "magnitude"
  c.prune.targets = "mlp"
  c.prune.blocks = 3
  c.prune.target = 0.8
  c.prune.calib_batches = 64  # the measured allocation needs this much (docs/studies.md)
  c.prune.sensitivity_ratios = (0.2, 0.4, 0.6, 0.8, 0.9, 0.99)
  return c


def get_sweep(arg=None):
  del arg
  return [{"prune.allocation": a, "seed": s}
          for a in ("uniform", "linear", "sensitivity") for s in range(3)]
