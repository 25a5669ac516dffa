"""One experiment, top to bottom: config -> data -> model -> pruning -> fine-tuning -> evaluation
-> results.json (-> Hugging Face export).

`run(config, workdir)` is idempotent: a finished workdir is only reported, an interrupted one
resumes. It is `run_group` of one run: the harness around a run's phases (lifecycle.py) that
checks the config, locks the workdir, trains a base model once and keeps a failed run from
stopping the others; a sweep's groups go through batched.py.
"""
import contextlib
import os
import time

import jax
import ml_collections

from blockprune_jax import batched
from blockprune_jax import compile_stats
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import files
from blockprune_jax import lifecycle
from blockprune_jax import parallel
from blockprune_jax import tasks as tasks_lib
from blockprune_jax import train
from blockprune_jax import validate
from blockprune_jax.errors import NoSpace
from blockprune_jax.errors import Preempted
from blockprune_jax.errors import UserError
from blockprune_jax.logs import RunLog


def run(config: ml_collections.ConfigDict, workdir: str, echo: bool = True,
        summary: bool | None = None) -> dict:
  """Runs (or resumes, or just reports) one experiment; returns the results dict, or raises what
  ended it. echo: print its progress lines; summary (default: echo): its table at the end."""
  summary = echo if summary is None else summary
  [results] = run_group([config], [workdir], echo=echo)
  if isinstance(results, BaseException):
    raise results
  if summary:
    print(summary_table(results))
  return results


def run_group(configs, workdirs, echo: bool = False) -> list:
  """Runs `configs`, each in its workdir, side by side (batched.py); per run its results dict or
  the exception that ended it. Ctrl-C / SIGTERM propagate, every run's step saved."""
  paths = [os.path.join(w, files.RESULTS) for w in workdirs]
  outcomes = [finished(p) for p in paths]
  for config, outcome in zip(configs, outcomes):
    if outcome is None:
      validate.validate(config)  # a finished run is not validated again
  if all(o is not None for o in outcomes):
    return outcomes
  parallel.maybe_initialize_distributed()
  with contextlib.ExitStack() as stack:
    todo = []
    for k, workdir in enumerate(workdirs):
      if outcomes[k] is None:
        stack.enter_context(parallel.workdir_lock(workdir))  # a second process is refused
        files.check_workdir_layout(workdir)
        outcomes[k] = finished(paths[k])  # the lock's holder may just have finished
        todo += [k] if outcomes[k] is None else []
    if todo:
      compile_stats.enable_persistent_cache(
          configs[0].runtime.compile_cache
          or os.path.join(data_lib.cache_root(configs[0].data), "jax_compile"))
      compile_stats.install()
      logs = {k: stack.enter_context(_Closing(RunLog(workdirs[k], config=configs[k], echo=echo)))
              for k in todo}
      preps, own = [], {}
      for k in todo:  # preparing (base model, pruning, measured allocations) goes run by run
        t0 = time.time()
        prep = _attempt([logs[k]], _prepare, configs[k], workdirs[k], logs[k].log, t0)
        if isinstance(prep, Exception):
          outcomes[k] = prep
          continue
        preps.append((k, prep))
        own[k] = (time.time() - t0, compile_stats.since(prep.compiled_before))
      for group in batched.by_shape(preps):
        _complete(group, outcomes, logs, own)
  return outcomes


def finished(results_path):
  """A finished run's results, else None."""
  return files.read_results(results_path, primary=parallel.processes()[0] == 0)


class _Closing:
  """A run's RunLog in a group: it closes as failed when its run failed, though the group went on."""

  def __init__(self, log):
    self.log, self.failed = log, False

  def __enter__(self):
    self.log.__enter__()
    return self

  def __exit__(self, exc_type, exc, tb):
    self.log.close(exit_code=1 if exc_type is not None or self.failed else 0)


def _attempt(logs, fn, *args, **kwargs):
  """fn(*args, **kwargs), or the exception that ended it (the runs of `logs` then close as
  failed). Preemption is no failure and a full disk would fail every run alike: both propagate."""
  try:
    return fn(*args, **kwargs)
  except (Preempted, NoSpace):
    raise
  except Exception as e:  # pylint: disable=broad-except
    for log in logs:
      log.failed = True
    return e


def _prepare(config, workdir, log, t_start) -> lifecycle.Prepared:
  """The start line, the base model (trained from scratch once), then lifecycle.prepare."""
  tasks_lib.load_tasks(config)  # eval.tasks' datasets: one that cannot load fails before training
  dev = jax.devices()[0]
  log.event("start", f"{workdir}: {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}), "
            f"{jax.process_count()} process(es)", config=config.to_dict(),
            devices=[str(d) for d in jax.devices()])
  if config.base.steps > 0 and config.model.init == "scratch":
    base_dir = config.base.dir or os.path.join(workdir, "base")
    base = base_config(config)
    check_base(base, base_dir)
    if not os.path.isfile(os.path.join(base_dir, files.RESULTS)):
      log.event("base", f"training the dense base model once ({base.train.steps} steps) in "
                f"{base_dir}", base_dir=base_dir)
    run(base, base_dir, summary=False)  # its training progress shows, not its table
    parallel.sync("base model exported")
    config = config_lib.apply_overrides(config, {
        "model.init": "pretrained", "model.name_or_path": os.path.join(base_dir, "export")})
  return lifecycle.prepare(config, workdir, log, t_start)


def _complete(group, outcomes, logs, own):
  """The phases after preparing of (index, prepared run) pairs: one run's, or K's as one program
  (batched.complete), each run with its share of the group's time."""
  if len(group) == 1:
    [(k, prep)] = group
    outcomes[k] = _attempt([logs[k]], lambda: lifecycle.finish(prep, *lifecycle.fine_tune(prep)))
    return
  preps = [p for _, p in group]
  t_shared, before = time.time(), compile_stats.snapshot()
  done = _attempt([logs[k] for k, _ in group], batched.complete, preps)
  shared_s, shared_compiled = time.time() - t_shared, compile_stats.since(before)
  for i, (k, prep) in enumerate(group):
    outcome = done if isinstance(done, Exception) else done[i]
    if isinstance(outcome, Exception):
      logs[k].failed, outcomes[k] = True, outcome
      continue
    outcomes[k] = _attempt([logs[k]], lifecycle.finish, prep, *outcome,
                           **batched.share(i, preps, own[k], shared_s, shared_compiled))


def base_config(config):
  """The dense base model a from-scratch study prunes (trained once); its seed is base.seed, so
  runs that differ only in seed share one base."""
  b = config.base
  return config_lib.apply_overrides(config, {
      "base.steps": 0, "role": "base", "prune.method": "none", "distill.teacher": "",
      "seed": b.seed,
      "train.steps": b.steps, "train.epochs": 0.0, "train.learning_rate": b.learning_rate,
      "train.batch_size": b.batch_size or config.train.batch_size,
      "train.warmup_steps": max(1, b.steps // 20), "eval.splits": ("validation",),
      "eval.tasks": (), "export.hf": True})  # the dense control's tasks are the reference


def check_base(base, base_dir):
  """A finished base in base_dir must have been trained the way this run would train it."""
  path = os.path.join(base_dir, files.RESULTS)
  if not files.readable_json(path):
    return  # none yet, or unreadable: run(base) trains (or resumes) it again
  saved = files.load_json(path).get("config") or {}
  try:
    train.check_resumable(train.resume_keys(saved), train.resume_keys(base), base_dir)
  except UserError as e:
    raise UserError(f"base.dir: {e}; the base model is shared by every run that names this "
                    "directory") from None


def summary_table(results) -> str:
  pr = results.get("pruning", {})
  sp = results.get("sparsity", {})
  lines = [f"method {pr.get('method', 'none')}  allocation {pr.get('allocation', '-')}  "
           f"ratios/block {_fmt_list(pr.get('ratios_per_block'))}",
           f"sparsity overall {sp.get('overall', 0):.4f}  per block "
           f"{_fmt_list(sp.get('per_block'))}",
           f"{'split':<12}{'perplexity':>12}{'tokens':>10}{'tokens/s':>12}"]
  for split, r in results.get("eval", {}).items():
    lines.append(f"{split:<12}{r['perplexity']:>12.3f}{r['tokens_scored']:>10d}"
                 f"{r['tokens_per_s']:>12,.0f}")
  lines += tasks_lib.summary_lines(results)
  return "\n".join(lines)


def _fmt_list(xs):
  return "-" if not xs else "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"
