"""Speed of evaluation and training on whatever backend is present: tokens/s, MFU, memory.

    python -m blockprune_jax.bench eval  --preset=gpt2 --seq_len=1024 --batch=16 --dtype=bfloat16
    python -m blockprune_jax.bench train --preset=gpt2 --seq_len=1024 --batch=16 --dtype=bfloat16
    python -m blockprune_jax.bench mask     # cost of masked training vs a dense step
    python -m blockprune_jax.bench compact  # eval of a 50 %-neuron compacted model vs dense

Random weights and tokens (speed does not depend on them). FLOPs follow PaLM's count:
6 N + 12 L D T per trained token and a third of that per evaluated token, with N the
parameters that take part in matrix multiplies (all but the position table; the tied LM head
counts). For GPT-2 124M at T = 1024 that is ~0.86 GFLOP per trained token (DESIGN.md).
"""
import dataclasses
import json
import time

import jax
import numpy as np
from absl import app
from absl import flags

from blockprune_jax import evaluate as eval_lib
from blockprune_jax import model as model_lib
from blockprune_jax import parallel

_PRESET = flags.DEFINE_string("preset", "gpt2", f"model shape: {', '.join(model_lib.PRESETS)}")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "tokens per sequence")
_BATCH = flags.DEFINE_integer("batch", 16, "global batch (sequences)")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
_ATTN = flags.DEFINE_string("attention", "auto", "auto | cudnn | xla")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after 2 warm-up steps)")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "mask / compact: pruned fraction of the MLPs")
_JSON = flags.DEFINE_string("json", "", "also append the result as a JSON line to this file")

# Dense bf16 peak FLOP/s per chip, from vendor data sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def flops_per_token(cfg: model_lib.GPT2Config, seq_len: int, train: bool) -> float:
  shapes = model_lib.init_shapes(cfg)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) - cfg.n_positions * cfg.n_embd
  f = 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len
  return f if train else f / 3


def peak_flops():
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak * jax.device_count()
  return None


def peak_memory_gb():
  try:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30 or None
  except Exception:  # pylint: disable=broad-except  # CPU backends may not report
    return None


def _time(fn, steps):
  """Seconds per call of fn() after two warm-up calls; fn returns something to block on."""
  for _ in range(2):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def model_config():
  return model_lib.preset(_PRESET.value, dtype=_DTYPE.value, attention=_ATTN.value,
                          n_positions=max(1024, _SEQ.value), dropout=0.0)


def bench_eval(cfg, params=None):
  mesh = parallel.data_mesh()
  params = parallel.replicate(params if params is not None else model_lib.init_params(cfg, 0), mesh)
  step = eval_lib.make_eval_step(model_lib.logits_fn(cfg), mesh)
  b, t = _BATCH.value, _SEQ.value
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
  batch = parallel.shard_batch((ids, ids, np.ones((b, t), np.float32)), mesh)
  sec = _time(lambda: step(params, *batch), _STEPS.value)
  return _report("eval", cfg, b * t / sec, train=False)


def bench_train(cfg, masks=None, label="train"):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from blockprune_jax import train  # pylint: disable=import-outside-toplevel
  mesh = parallel.data_mesh()
  t_cfg = ml_collections.ConfigDict(dict(
      warmup_steps=10, learning_rate=1e-4, schedule="cosine", grad_clip=1.0, b1=0.9, b2=0.95,
      weight_decay=0.1))
  optimizer, _ = train.make_optimizer(t_cfg, 1000)
  params = model_lib.init_params(cfg, 0)
  state = parallel.replicate(train.init_state(params, optimizer, masks or {}, seed=0), mesh,
                             donatable=True)
  step = train.make_train_step(cfg, optimizer, mesh)
  b, t = _BATCH.value, _SEQ.value
  seq = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, b, t + 1)).astype(np.int32)
  batch = parallel.shard_batch(seq, mesh, axis=1)
  holder = {"state": state}

  def one():
    holder["state"], m = step(holder["state"], batch, {})
    return m["loss"]
  sec = _time(one, _STEPS.value)
  return _report(label, cfg, b * t / sec, train=True)


def _report(what, cfg, tok_s, train):
  peak = peak_flops()
  f = flops_per_token(cfg, _SEQ.value, train)
  r = {"bench": what, "preset": _PRESET.value, "seq_len": _SEQ.value, "batch": _BATCH.value,
       "dtype": cfg.dtype, "attention": cfg.attention, "tokens_per_s": round(tok_s),
       "mfu": round(tok_s * f / peak, 4) if peak else None,
       "gflop_per_token": round(f / 1e9, 4), "peak_memory_gb": peak_memory_gb(),
       "backend": jax.default_backend(), "devices": jax.device_count(),
       "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}
  print(json.dumps(r))
  if _JSON.value:
    with open(_JSON.value, "a") as f_out:
      f_out.write(json.dumps(r) + "\n")
  return r


def bench_mask(cfg):
  """Masked vs dense training step: the masks multiply gradients, updates and parameters."""
  from blockprune_jax import pruning  # pylint: disable=import-outside-toplevel
  dense = bench_train(cfg, label="train_dense")
  params = model_lib.init_params(cfg, 0)
  ratios = [_SPARSITY.value] * cfg.n_layer
  masks = pruning.compute_masks(params, ratios, method="magnitude", targets="mlp", scope="matrix",
                                blocks=3)
  masked = bench_train(cfg, masks=masks, label="train_masked")
  overhead = dense["tokens_per_s"] / masked["tokens_per_s"] - 1
  print(json.dumps({"bench": "mask_overhead", "overhead": round(overhead, 4)}))


def bench_compact(cfg):
  """Eval speed of a model whose MLPs lost `sparsity` of their hidden units, compacted."""
  from blockprune_jax import pruning  # pylint: disable=import-outside-toplevel
  dense = bench_eval(cfg)
  params = model_lib.init_params(cfg, 0)
  masks = pruning.compute_masks(params, [_SPARSITY.value] * cfg.n_layer, method="neurons",
                                targets="mlp", scope="matrix", blocks=3)
  small, widths = pruning.compact_mlp(pruning.apply_masks(params, masks), masks)
  compact = bench_eval(dataclasses.replace(cfg, mlp_widths=tuple(widths)), small)
  print(json.dumps({"bench": "compact_speedup",
                    "speedup": round(compact["tokens_per_s"] / dense["tokens_per_s"], 4)}))


def main(argv):
  what = argv[1] if len(argv) > 1 else "eval"
  cfg = model_config()
  {"eval": bench_eval, "train": bench_train, "mask": bench_mask,
   "compact": bench_compact}[what](cfg)


if __name__ == "__main__":
  app.run(main)
