"""Speed of evaluation and training on whatever backend is present: tokens/s, MFU, memory.

    python -m blockprune_jax.bench eval  --preset=gpt2 --seq_len=1024 --batch=16 --dtype=bfloat16
    python -m blockprune_jax.bench train --preset=gpt2 --seq_len=1024 --batch=16 --dtype=bfloat16
    python -m blockprune_jax.bench mask     # cost of masked training vs a dense step
    python -m blockprune_jax.bench compact  # eval of a 50 %-neuron compacted model vs dense
    python -m blockprune_jax.bench all --batch=16 --eval_batch=32  # all four, one process
    python -m blockprune_jax.bench sweep --preset=tiny --runs=4  # a sweep's cost beyond its steps
    python -m blockprune_jax.bench sweep --preset=tiny --runs=3 --batch_runs=3  # vs side by side
    python -m blockprune_jax.bench side_by_side --runs=3  # one step of 3 runs (vmap, map) vs 1
    python -m blockprune_jax.bench tasks --preset=tiny --seq_len=256 --batch=8 --steps=200  # vs HFLM
    python -m blockprune_jax.bench aot --topology=v5e:2x4 --preset=gpt2-xl --batch=32 \
        --fsdp=8 --remat=block  # will it fit? per-chip memory on a TPU slice, from any host
    python -m blockprune_jax.bench fit --fsdp=-1 --remat=block --scan_layers  # largest batch per
        # chip of every preset on v5e-8, v4-8, v6e-8 (docs/scale.md, "Will it fit?")

JSON lines on stdout, one per figure (`--json=FILE` appends them too); what each field means, and
how the timing is done: docs/speed.md.
"""
import dataclasses
import datetime
import functools
import sys
import time
import types

import jax
import numpy as np
from absl import app
from absl import flags

from blockprune_jax import batched
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import files
from blockprune_jax import flops
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax.errors import UserError

_PRESET = flags.DEFINE_string("preset", "gpt2", f"model shape: {', '.join(model_lib.PRESETS)}")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "tokens per sequence")
_BATCH = flags.DEFINE_integer("batch", 16, "global batch (sequences) of training, and of "
                              "evaluation unless --eval_batch is set")
_EVAL_BATCH = flags.DEFINE_integer("eval_batch", 0, "evaluation batch; 0 = --batch")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
_ATTN = flags.DEFINE_string("attention", "auto", "auto | cudnn | xla")
_VOCAB = flags.DEFINE_integer("vocab_size", 50257, "vocabulary (smaller: quick CPU smoke runs)")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after --warmup untimed ones)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "mask / compact: pruned fraction of the MLPs")
_RUNS = flags.DEFINE_integer("runs", 4, "sweep: runs of one shape, one after another; "
                             "side_by_side: runs in the one program")
_SWEEP_STEPS = flags.DEFINE_integer("sweep_steps", 20, "sweep: fine-tuning steps per run")
_BATCH_RUNS = flags.DEFINE_integer("batch_runs", 1, "sweep: > 1 also runs the same sweep with "
                                   "sweep.batch_runs=K (side by side) and reports the ratio")
_SWEEP_CONFIG = flags.DEFINE_string("sweep_config", "", "sweep: measure this config file's "
                                     "sweep (get_sweep or --sweep) instead of --preset runs")
_SWEEP_SPECS = flags.DEFINE_multi_string("sweep", [], "sweep, with --sweep_config: KEY=SPEC as "
                                         "in blockprune_jax.sweep")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x4", "aot: the TPU slice to compile for, as "
                                "jax.experimental.topologies names it (v4:2x2x1, v6e:2x4, ...), "
                                "or GPUs as kind:count (h100:8, a100-40:1, ...)")
_FSDP = flags.DEFINE_integer("fsdp", 1, "aot: mesh.fsdp of the train step (1 = replicated state, "
                             "-1 = sharded over every chip)")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "block"], "aot: train.remat of the train step")
_PRESETS = flags.DEFINE_list("presets", "gpt2,gpt2-medium,gpt2-large,gpt2-xl",
                             "fit: the models of the table")
_TOPOLOGIES = flags.DEFINE_list("topologies", "v5e:2x4,v4:2x2x1,v6e:2x4",
                                "fit: the TPU slices or GPU targets of the table")
_CAP = flags.DEFINE_integer("max_per_chip", 64, "fit: the largest sequences per chip tried")
_SCAN = flags.DEFINE_bool("scan_layers", False, "model.scan_layers: the blocks as one lax.scan")
_JSON = flags.DEFINE_string("json", "", "also append each result as a JSON line to this file")

WHATS = ("eval", "train", "mask", "compact", "all", "sweep", "side_by_side", "tasks", "aot",
         "fit")


# --- figures that do not depend on the flags ---------------------------------------------

def peak_memory_gb():
  """The first device's high-water mark of this process (GiB); None where not reported (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
    return round(stats.get("peak_bytes_in_use", 0) / 2**30, 3) or None
  except Exception:  # pylint: disable=broad-except  # CPU backends may not report
    return None


def program_memory_gb(compiled):
  """XLA's memory figure of a compiled step (GiB): arguments + outputs + temporaries - aliased.

  Unlike the device high-water mark it belongs to this one program, whatever ran before."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return round(total / 2**30, 3)
  except Exception:  # pylint: disable=broad-except  # not every backend / version reports it
    return None


def attention_impl(compiled) -> str:
  """'cudnn' if the compiled step calls cuDNN's fused attention, else 'xla'.

  Read from the program, not the config: `attention=auto` falls back to XLA silently."""
  try:
    return "cudnn" if "__cudnn$fmha" in compiled.as_text() else "xla"
  except Exception:  # pylint: disable=broad-except
    return "unknown"


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def compile_step(step, *args):
  """(compiled step, seconds): ahead of time, so the timing below never includes compilation."""
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def time_calls(fn, steps: int, warmup: int) -> float:
  """Seconds per call of fn() over `steps` calls after `warmup` untimed ones.

  fn returns device arrays; every output is waited for with jax.block_until_ready (dispatch is
  asynchronous: without it the loop would time the host queueing work, not the device doing it).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  outs = [fn() for _ in range(steps)]
  jax.block_until_ready(outs)
  return (time.perf_counter() - t0) / steps


# --- the benches -------------------------------------------------------------------------

def model_config():
  return model_lib.preset(_PRESET.value, dtype=_DTYPE.value, attention=_ATTN.value,
                          n_positions=max(1024, _SEQ.value), dropout=0.0,
                          vocab_size=_VOCAB.value, scan_layers=_SCAN.value)


@functools.lru_cache(maxsize=None)
def random_params(cfg):
  """init_params(cfg, 0), made once per shape: every figure of `all` reuses it (a jitted init
  compiles anew on each call). Read-only: training copies it before donating its state."""
  return model_lib.init_params(cfg, 0)


def eval_batch() -> int:
  return _EVAL_BATCH.value or _BATCH.value


def _runs_of(tree, runs):
  """`tree` as `runs` identical runs stacked on a leading axis (runs=0: `tree` itself)."""
  return jax.tree.map(lambda x: np.stack([np.asarray(x)] * runs), tree) if runs else tree


def bench_eval(cfg, params=None, label="eval", runs=0, mode=""):
  """Forward + per-token NLL of one batch: the step that perplexity evaluation runs.

  runs=K, mode=vmap|map: K runs side by side as one program (sweep.batch_runs)."""
  mesh = parallel.data_mesh()
  params = params if params is not None else random_params(cfg)
  params = parallel.replicate(_runs_of(params, runs), mesh)
  apply_fn = model_lib.logits_fn(cfg)
  step = (batched.make_eval_step(apply_fn, mesh, mode) if mode
          else eval_lib.make_eval_step(apply_fn, mesh))
  b, t = eval_batch(), _SEQ.value
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t)).astype(np.int32)
  batch = parallel.shard_batch((ids, ids, np.ones((b, t), np.float32)), mesh)
  compiled, compile_s = compile_step(step, params, *batch)
  sec = time_calls(lambda: compiled(params, *batch), _STEPS.value, _WARMUP.value)
  return _speed_record(label, cfg, b * max(runs, 1), sec, compiled, compile_s, train=False)


def bench_train(cfg, masks=None, label="train", runs=0, mode=""):
  """One optimizer step (AdamW, clipping, masks applied to gradients, updates and weights).

  runs=K, mode=vmap|map: K runs side by side as one program (sweep.batch_runs)."""
  from blockprune_jax import train  # pylint: disable=import-outside-toplevel
  mesh = parallel.data_mesh()
  t_cfg = types.SimpleNamespace(warmup_steps=10, learning_rate=1e-4, schedule="cosine",
                                grad_clip=1.0, b1=0.9, b2=0.95, weight_decay=0.1)
  optimizer, _ = train.make_optimizer(t_cfg, 1000)  # for the optimizer state's structure
  state = train.init_state(random_params(cfg), optimizer, masks or {}, seed=0)
  state = parallel.replicate(_runs_of(state, runs), mesh, donatable=True)
  settings = train.optimizer_settings(t_cfg)
  step = (batched.make_train_step(cfg, settings, mesh, mode) if mode
          else train.make_train_step(cfg, settings, mesh))
  b, t = _BATCH.value, _SEQ.value
  seq = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, b, t + 1)).astype(np.int32)
  batch = parallel.shard_batch(_runs_of(seq, runs), mesh, axis=2 if runs else 1)
  lr = parallel.replicate(_runs_of(np.float32(t_cfg.learning_rate), runs), mesh)  # an input
  compiled, compile_s = compile_step(step, state, batch, {}, lr)
  holder = {"state": state}

  def one():
    # The state is donated: keep only the newest one alive.
    holder["state"], m = compiled(holder["state"], batch, {}, lr)
    return m["loss"]
  sec = time_calls(one, _STEPS.value, _WARMUP.value)
  return _speed_record(label, cfg, b * max(runs, 1), sec, compiled, compile_s, train=True)


def bench_side_by_side(cfg, runs: int):
  """Per-run cost of K runs side by side (vmap and lax.map) against one run alone, for the train
  and the eval step: per_run_ratio = K-run step time / (K x one-run step time), < 1 is faster."""
  out = []
  for what, bench in (("train", bench_train), ("eval", bench_eval)):
    one = bench(cfg, label=f"{what}_one_run")
    for mode in ("vmap", "map"):
      k = bench(cfg, label=f"{what}_{runs}_runs_{mode}", runs=runs, mode=mode)
      out.append(emit({"bench": "side_by_side", "step": what, "mode": mode, "runs": runs,
                       "per_run_ratio": round(k["step_ms"] / (runs * one["step_ms"]), 4),
                       "one_run_step_ms": one["step_ms"], "runs_step_ms": k["step_ms"],
                       **_shape(cfg, _BATCH.value if what == "train" else eval_batch())}))
  return out


def bench_mask(cfg, dense=None):
  """Masked vs dense training step: the masks multiply gradients, updates and parameters.

  `dense`: an already measured dense train record (from `all`) to compare against."""
  from blockprune_jax.prune import pruning  # pylint: disable=import-outside-toplevel
  dense = dense or bench_train(cfg, label="train_dense")
  params = random_params(cfg)
  ratios = [_SPARSITY.value] * cfg.n_layer
  masks = pruning.compute_masks(params, ratios, method="magnitude", targets="mlp", scope="matrix",
                                blocks=3)
  masked = bench_train(cfg, masks=masks, label="train_masked")
  overhead = dense["tokens_per_s"] / masked["tokens_per_s"] - 1
  return emit({"bench": "mask_overhead", "overhead": round(overhead, 4),
               "dense_tokens_per_s": dense["tokens_per_s"],
               "masked_tokens_per_s": masked["tokens_per_s"], "sparsity": _SPARSITY.value,
               **_shape(cfg, _BATCH.value)})


def bench_compact(cfg, dense=None):
  """Eval speed of a model whose MLPs lost `sparsity` of their hidden units, compacted.

  `dense`: an already measured dense eval record (from `all`) to compare against."""
  from blockprune_jax.prune import pruning  # pylint: disable=import-outside-toplevel
  dense = dense or bench_eval(cfg)
  params = random_params(cfg)
  masks = pruning.compute_masks(params, [_SPARSITY.value] * cfg.n_layer, method="neurons",
                                targets="mlp", scope="matrix", blocks=3)
  small, widths = pruning.compact_mlp(pruning.apply_masks(params, masks), masks)
  compact = bench_eval(dataclasses.replace(cfg, mlp_widths=tuple(widths)), small,
                       label="eval_compact")
  return emit({"bench": "compact_speedup",
               "speedup": round(compact["tokens_per_s"] / dense["tokens_per_s"], 4),
               "dense_tokens_per_s": dense["tokens_per_s"],
               "compact_tokens_per_s": compact["tokens_per_s"], "sparsity": _SPARSITY.value,
               "mlp_widths": [int(w) for w in widths], **_shape(cfg, eval_batch())})


def bench_all(cfg) -> int:
  """eval, compact, train, mask in one process; returns the number of failed figures.

  Evaluations first: the device high-water mark only grows, and training needs more memory per
  sequence, so each speed record's peak_memory_gb stays close to its own."""
  results, failed = {}, 0
  plan = [("eval", lambda: bench_eval(cfg)),
          ("compact_speedup", lambda: bench_compact(cfg, dense=results.get("eval"))),
          ("train", lambda: bench_train(cfg)),
          ("mask_overhead", lambda: bench_mask(cfg, dense=results.get("train")))]
  for name, run in plan:
    try:
      results[name] = run()
    except Exception as e:  # pylint: disable=broad-except  # one failure must not stop the rest
      failed += 1
      emit({"bench": name, "error": f"{type(e).__name__}: {e}"[:1000], **_shape(cfg, None)})
  return failed


# --- records -----------------------------------------------------------------------------

def _shape(cfg, batch):
  return {"preset": _PRESET.value, "seq_len": _SEQ.value, "batch": batch, "dtype": cfg.dtype}


def _speed_record(what, cfg, batch, sec, compiled, compile_s, train):
  tok_s = batch * _SEQ.value / sec
  f = flops.flops_per_token(cfg, _SEQ.value, train)
  mfu = flops.mfu(cfg, _SEQ.value, tok_s, jax.devices(), train)
  return emit({"bench": what, **_shape(cfg, batch), "attention": cfg.attention,
               "attention_impl": attention_impl(compiled), "tokens_per_s": round(tok_s),
               "step_ms": round(sec * 1e3, 3), "compile_s": round(compile_s, 3),
               "steps": _STEPS.value, "warmup": _WARMUP.value,
               "mfu": round(mfu, 4) if mfu is not None else None,
               "gflop_per_token": round(f / 1e9, 4), "peak_memory_gb": peak_memory_gb(),
               "program_memory_gb": program_memory_gb(compiled)})


def emit(record: dict) -> dict:
  """Adds where and when, prints the record as one JSON line and appends it to --json."""
  record = {**record, "backend": jax.default_backend(), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": utc_now()}
  return files.emit_json_line(record, _JSON.value)


def check_flags(what: str) -> None:
  """Refuses settings that would give a meaningless figure, before anything compiles."""
  if what not in WHATS:
    raise app.UsageError(f"unknown bench {what!r}: expected one of {', '.join(WHATS)}")
  if _PRESET.value not in model_lib.PRESETS:
    raise app.UsageError(f"--preset={_PRESET.value}: expected one of "
                         f"{', '.join(model_lib.PRESETS)}")
  if _STEPS.value < 1:
    raise app.UsageError(f"--steps={_STEPS.value}: at least one timed step is needed")
  if _WARMUP.value < 0:
    raise app.UsageError(f"--warmup={_WARMUP.value} must be >= 0")
  if not 0.0 <= _SPARSITY.value < 1.0:
    raise app.UsageError(f"--sparsity={_SPARSITY.value} must be in [0, 1)")
  if _VOCAB.value < 2:
    raise app.UsageError(f"--vocab_size={_VOCAB.value} must be >= 2")
  if _SEQ.value < 2:
    raise app.UsageError(f"--seq_len={_SEQ.value} must be >= 2")
  n = jax.device_count()
  for name, b in (("batch", _BATCH.value), ("eval_batch", eval_batch())):
    if b < 1 or b % n:
      raise app.UsageError(f"--{name}={b} must be a positive multiple of the {n} devices "
                           "(the batch is split across them)")


def main(argv):
  what = argv[1] if len(argv) > 1 else "eval"
  if what in ("aot", "fit"):  # compiles for TPU chips that are not here: local devices play no part
    from blockprune_jax.bench import aot as bench_aot  # pylint: disable=import-outside-toplevel
    slice_flags = dict(seq_len=_SEQ.value, dtype=_DTYPE.value, fsdp=_FSDP.value,
                       remat=_REMAT.value, scan_layers=_SCAN.value)
    try:
      if what == "fit":
        bench_aot.main_fit(emit, presets=_PRESETS.value, topologies=_TOPOLOGIES.value,
                           cap=_CAP.value, **slice_flags)
      else:
        bench_aot.main(emit, topology=_TOPOLOGY.value, preset=_PRESET.value,
                       batch=_BATCH.value, eval_batch=eval_batch(), **slice_flags)
    except UserError as e:
      sys.exit(f"bench {what}: {e}")
    return
  check_flags(what)
  cfg = model_config()
  if what == "all":
    sys.exit(1 if bench_all(cfg) else 0)
  if what == "sweep":
    from blockprune_jax.bench import sweep as bench_sweep  # pylint: disable=import-outside-toplevel
    if _SWEEP_CONFIG.value:
      emit(bench_sweep.run_config(_SWEEP_CONFIG.value, _SWEEP_SPECS.value,
                                  batch_runs=_BATCH_RUNS.value))
      return
    emit({**bench_sweep.run(preset_shape=model_lib.PRESETS[_PRESET.value], seq_len=_SEQ.value,
                            batch=_BATCH.value, dtype=_DTYPE.value, vocab_size=_VOCAB.value,
                            steps=_SWEEP_STEPS.value, runs=_RUNS.value,
                            batch_runs=_BATCH_RUNS.value),
          "preset": _PRESET.value, "seq_len": _SEQ.value, "batch": _BATCH.value,
          "dtype": _DTYPE.value})
    return
  if what == "side_by_side":
    bench_side_by_side(cfg, _RUNS.value)
    return
  if what == "tasks":  # --steps = documents of the multiple-choice task
    from blockprune_jax.bench import tasks as bench_tasks  # pylint: disable=import-outside-toplevel
    emit(bench_tasks.run(preset_shape=model_lib.PRESETS[_PRESET.value], n_positions=_SEQ.value,
                         batch=eval_batch(), docs=_STEPS.value))
    return
  {"eval": bench_eval, "train": bench_train, "mask": bench_mask,
   "compact": bench_compact}[what](cfg)


if __name__ == "__main__":
  app.run(main)
