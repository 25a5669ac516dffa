"""Masked fine-tuning of GPT-2 XL (1.5B) on one Cloud TPU v5e-8 (8 chips x 16 GiB).

    launch/tpu_vm.sh run configs/finetune_xl.py runs/xl     # ACCELERATOR_TYPE=v5litepod-8

Replicated, its float32 parameters, gradients and AdamW moments alone (23 GiB) exceed a chip:
mesh.fsdp=-1 shards them (and the masks) over the 8 chips, model.scan_layers=True gathers one
block's weights at a time, and train.remat=block keeps the activations of 4 sequences per chip
within HBM. Check the fit from any host first:

    python -m blockprune_jax.bench aot --topology=v5e:2x4 --preset=gpt2-xl --seq_len=1024 \
        --batch=32 --dtype=bfloat16 --fsdp=8 --remat=block --scan_layers
"""
from configs import finetune


def get_config():
  c = finetune.get_config()
  c.model.name_or_path = "gpt2-xl"
  c.model.dtype = "bfloat16"
  c.model.scan_layers = True
  c.prune.method = "magnitude"  # the MLP masks bench aot compiles with
  c.prune.targets = "mlp"
  c.prune.target = 0.5
  c.train.batch_size = 32  # 4 sequences per chip
  c.train.remat = "block"
  c.eval.batch_size = 32
  c.mesh.fsdp = -1
  return c
