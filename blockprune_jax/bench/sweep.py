"""What a sweep costs beyond its steps (docs/speed.md): K pruned runs of one shape, one after
another in one process, each split into steady-state compute and everything else.

    python -m blockprune_jax.bench sweep --preset=tiny --runs=4 --sweep_steps=20

A scratch model on the builtin corpus, magnitude-pruned MLPs at a different sparsity per run,
masked fine-tuning, validation perplexity. --batch_runs=K > 1 runs the sweep again with
sweep.batch_runs=K and compares; --sweep_config=PATH times a config file's own sweep instead
(its get_sweep() or --sweep=KEY=SPEC flags, no dense controls; its base model trained untimed).
"""
import os
import tempfile
import time

from blockprune_jax import config_lib
from blockprune_jax import files
from blockprune_jax import sweep


def steady_seconds(results: dict) -> float:
  """Train steps after the first plus evaluation batches after the first."""
  tr, steady = results.get("train") or {}, 0.0
  if tr.get("steps") and tr.get("tokens_per_s"):
    steady += tr["tokens"] / tr["steps"] / tr["tokens_per_s"] * (tr["steps"] - 1)
  for e in list((results.get("eval") or {}).values()) + list(
      ((results.get("oneshot") or {}).get("eval") or {}).values()):
    steady += max(0.0, e["seconds"] - e["first_batch_s"])
  return steady


def sweep_config(*, preset_shape, seq_len, batch, dtype, vocab_size, steps):
  """The base config of the benchmark sweep (no base model, no controls, no report)."""
  from configs import base  # pylint: disable=import-outside-toplevel
  n_layer, n_embd, n_head = preset_shape
  c = base.get_config()
  c.lock()
  return config_lib.apply_overrides(c, {
      "model.init": "scratch", "model.n_layer": n_layer, "model.n_embd": n_embd,
      "model.n_head": n_head, "model.n_positions": max(seq_len, 64), "model.dtype": dtype,
      "model.dropout": 0.0, "data.source": "builtin", "data.seq_len": seq_len,
      "data.tokenizer": "bytes" if vocab_size < 50257 else "gpt2-offline",
      "eval.splits": ("validation",), "eval.batch_size": batch, "eval.max_tokens": 64 * seq_len,
      "train.steps": steps, "train.batch_size": batch, "train.log_every": max(1, steps // 4),
      "checkpoint.every_steps": 10 * steps, "prune.method": "magnitude",
      "prune.allocation": "uniform", "prune.blocks": min(3, n_layer), "sweep.controls": False,
      "wandb.mode": "disabled"})


def run(*, preset_shape, seq_len, batch, dtype, vocab_size, steps, runs, workdir="",
        batch_runs=1) -> dict:
  """The figures of `time_sweep` for `runs` runs at sparsities from 0.3 to 0.7."""
  config = sweep_config(preset_shape=preset_shape, seq_len=seq_len, batch=batch, dtype=dtype,
                        vocab_size=vocab_size, steps=steps)
  targets = [round(0.3 + 0.4 * i / max(runs - 1, 1), 4) for i in range(runs)]
  return time_sweep(config, [{"prune.target": t} for t in targets], workdir, batch_runs, steps)


def run_config(path, specs, *, workdir="", batch_runs=1) -> dict:
  """The figures of `time_sweep` for the sweep of a config file."""
  from blockprune_jax import pipeline  # pylint: disable=import-outside-toplevel
  module = config_lib.load_file(path, "_bench_sweep_config")
  config = config_lib.apply_overrides(module.get_config(), {"sweep.controls": False})
  runs = sweep.expand_sweep(config, specs, None if specs else sweep.load_get_sweep(path))
  workdir = workdir or tempfile.mkdtemp(prefix="bench_sweep_")
  if config.base.steps > 0 and config.model.init == "scratch":  # trained once, not timed
    config = config_lib.apply_overrides(config, {"base.dir": os.path.join(workdir, "base")})
    pipeline.run(pipeline.base_config(config), config.base.dir, echo=False)
  return dict(time_sweep(config, runs, workdir, batch_runs, config.train.steps), config=path)


def time_sweep(config, runs_list, workdir, batch_runs, steps) -> dict:
  """Runs the sweep one by one (and side by side with batch_runs > 1); returns the figures."""
  workdir = workdir or tempfile.mkdtemp(prefix="bench_sweep_")
  runs = len(runs_list)
  wall, results = _run_timed(config, os.path.join(workdir, "one_by_one"), runs_list)
  seconds = [r["runtime"]["seconds"] for r in results]
  steady = [steady_seconds(r) for r in results]
  later = slice(1, None) if runs > 1 else slice(0, None)
  later_s = sum(seconds[later])
  per_run = later_s / len(seconds[later])
  out = {
      "bench": "sweep", "runs": runs, "steps_per_run": steps, "wall_s": round(wall, 2),
      "first_run_s": round(seconds[0], 2), "later_run_s": round(per_run, 2),
      "runs_per_hour": round(3600 / per_run, 1),
      "overhead_share_first": round(1 - steady[0] / seconds[0], 4),
      "overhead_share_later": round(1 - sum(steady[later]) / later_s, 4),
      "compile_s_first": results[0]["runtime"]["compile_s"],
      "compile_s_later": round(sum(r["runtime"]["compile_s"] for r in results[later])
                               / len(results[later]), 3),
      "compilations_later": [r["runtime"]["compilations"] for r in results[later]],
      "projected_216_runs_s": round(seconds[0] + 215 * per_run, 1),
  }
  if batch_runs > 1:
    batched = config_lib.apply_overrides(config, {"sweep.batch_runs": batch_runs})
    wall_b, results_b = _run_timed(batched, os.path.join(workdir, "side_by_side"), runs_list)
    out.update({
        "batch_runs": batch_runs, "side_by_side_wall_s": round(wall_b, 2),
        "side_by_side_ratio": round(wall_b / wall, 3),
        "side_by_side_overhead_share": round(
            1 - sum(map(steady_seconds, results_b)) / sum(r["runtime"]["seconds"]
                                                           for r in results_b), 4),
        "side_by_side_compilations": sum(r["runtime"]["compilations"] for r in results_b),
        "max_perplexity_diff": max(
            abs(a["perplexity"][s] - b["perplexity"][s])
            for a, b in zip(results, results_b) for s in a["perplexity"]),
    })
  return out


def _run_timed(config, workdir, runs_list):
  """(wall seconds, results.json of every run) of one sweep."""
  t0 = time.time()
  rows = sweep.run_sweep(config, workdir, runs_list, report=False)
  wall = time.time() - t0
  failed = [r for r in rows if r["status"] != "done"]
  if failed:
    raise RuntimeError(f"bench sweep: run {failed[0]['name']} failed: {failed[0].get('error')}")
  return wall, [files.load_json(os.path.join(r["workdir"], files.RESULTS)) for r in rows]
