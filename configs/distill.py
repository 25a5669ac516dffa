"""PruneGPT's distillation, done properly: GMP to 90 % (as prunegpt_gmp90) with a dense
fine-tuned teacher; loss (1-a) CE + a T^2 KL(teacher || student) per token; evaluation
perplexity is the plain next-token cross-entropy, never the distillation loss.

    python -m blockprune_jax.main --config=configs/finetune.py --workdir=runs/ft --config.export.hf=true
    python -m blockprune_jax.main --config=configs/distill.py --workdir=runs/distill \
        --config.distill.teacher=runs/ft
"""
from configs import prunegpt_gmp90


def get_config():
  c = prunegpt_gmp90.get_config()
  c.distill.teacher = "runs/ft"  # a workdir (its export/ is used), an HF directory or hub id
  c.distill.temperature = 2.0
  c.distill.alpha = 0.5
  return c
