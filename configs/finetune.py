"""Fine-tune GPT-2 on WikiText-2 (raw) and report validation / test perplexity.

    python -m blockprune_jax.main --config=configs/finetune.py --workdir=runs/ft

The earlier studies' setup: gpt2, seq 1024, AdamW lr 5e-5 with warmup and cosine decay,
3 epochs. Offline: --config.model.init=scratch --config.base.steps=2000 --config.data.source=builtin
(or a local HF directory in model.name_or_path). Add --config.export.hf=true to use the result
as a distillation teacher (configs/distill.py).
"""
from configs import base


def get_config():
  c = base.get_config()
  c.train.epochs = 3.0
  c.train.batch_size = 8
  c.train.learning_rate = 5e-5
  c.train.warmup_steps = 100
  c.train.eval_every = 200
  c.checkpoint.every_steps = 200
  return c
