"""configs/base.py shrunk for tests: a 2-layer, 32-wide byte-level GPT-2 on the builtin corpus.

    python -m blockprune_jax.main --config=tests/tiny.py --workdir=/tmp/tiny --config.train.steps=20
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model.init = "scratch"
  c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_positions = 2, 32, 2, 64
  c.model.dropout = 0.0
  c.data.source = "builtin"
  c.data.tokenizer = "bytes"
  c.data.seq_len = 32
  c.eval.splits = ("validation",)
  c.eval.max_tokens = 2000
  c.eval.batch_size = 8
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 2
  c.prune.blocks = 2
  return c
