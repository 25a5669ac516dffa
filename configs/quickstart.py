"""Offline quickstart: the whole study in miniature on a CPU, in a few minutes.

    python -m blockprune_jax.main --config=configs/quickstart.py --workdir=runs/quickstart

Trains a small GPT-2-shaped model (6 layers x 128, byte-level vocabulary) from scratch on the
builtin corpus (text shipped with Python),
exports it in Hugging Face format (runs/quickstart/base/export), then prunes its MLPs to 50 %
with uniform, linear and exponential front / middle / back allocations, fine-tunes each briefly
with the masks held, evaluates validation / test perplexity, and writes report.md and
ppl_vs_sparsity.png in the workdir. Running it again reuses what is done.
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
  c.eval.batch_size = 16
  c.base.steps = 200
  c.base.learning_rate = 2e-3
  c.train.batch_size = 16
  c.train.steps = 30
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 4
  c.train.log_every = 20
  c.checkpoint.every_steps = 100
  c.prune.method = "magnitude"
  c.prune.targets = "mlp"
  c.prune.blocks = 3
  c.prune.target = 0.5
  c.prune.spread = 0.4
  c.prune.growth = 2.0
  return c


def get_sweep(arg=None):
  del arg
  return [{"prune.allocation": a} for a in ("uniform", "linear", "exponential")]
