"""Zero-shot perplexity of a GPT-2 checkpoint (no pruning, no fine-tuning).

    python -m blockprune_jax.main --config=configs/eval.py --workdir=runs/zero_shot \
        --config.model.name_or_path=gpt2

Offline: --config.model.name_or_path=/path/to/hf_dir --config.data.source=builtin
(or --config.data.source=text --config.data.text_dir=DIR).
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model.init = "pretrained"
  c.prune.method = "none"
  c.train.steps = 0
  c.train.epochs = 0.0
  return c
