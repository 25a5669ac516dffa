"""Runs side by side: K runs of one shape trained and evaluated as one vmapped program
(`sweep.batch_runs`).

Runs of a sweep that differ only in what a program takes as input -- masks, pruning ratios and
method, seeds (data order, dropout), learning-rate values -- can be one program: every leaf of
the training state gains a leading run axis and the one-run update is mapped over it
(`train.make_train_step(batched=...)`, `evaluate.make_eval_step(batched=...)`). With
`jax.vmap` (sweep.side_by_side=vmap, the default on accelerators) K small runs fill an
accelerator that one leaves half idle; on a CPU (map, the default there) `jax.lax.map` runs them
one after another inside the program. Either way the group compiles once.

What stays per run is exactly what a run has on its own: its workdir, log, metrics, checkpoints
(in the one-run format: a group's run can be resumed alone, and the other way round),
results.json and export. Preparing (base model, pruning, measured allocations) is done run by
run; one-shot evaluation, fine-tuning and the final evaluation are shared.

Times in a batched run's results.json are its share: its own preparation plus the shared
phases divided by the group's size, so that the runs' `runtime.seconds` add up to the wall
time; `runtime.batch` names the group and its whole time. Throughputs (`tokens_per_s`) are the
program's, all runs' tokens counted.
"""
import contextlib
import json
import os
import time

import jax
import numpy as np

from blockprune_jax import checkpoint as ckpt_lib
from blockprune_jax import compile_stats
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import files
from blockprune_jax import keys
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax import pipeline
from blockprune_jax import pruning
from blockprune_jax import train
from blockprune_jax import trees
from blockprune_jax.logs import RunLog

# Keys whose values a batched program takes as inputs: runs may differ in them. Every other key
# (model, data, batch, optimizer structure, step count, evaluation) must agree within a group.
FREE_KEYS = keys.where(group=True)


# ----------------------------------------------------------------------------------------------
# Which runs can share a program
# ----------------------------------------------------------------------------------------------


def alone_reason(config) -> str | None:
  """Why this run cannot train side by side with others, or None when it can."""
  p = config.prune
  if p.method != "none" and p.schedule == "gradual":
    return "prune.schedule=gradual changes its masks while training"
  if p.method != "none" and p.when == "after_finetune":
    return "prune.when=after_finetune prunes after training"
  if p.method != "none" and pruning.criterion(p.method).compactable and p.compact:
    return "prune.compact evaluates a model of its own (smaller) shape"
  if config.distill.teacher:
    return "distillation (distill.teacher) is run one at a time"
  return None


def _shared(config) -> dict:
  return {k: v for k, v in config_lib.flatten(config).items() if k not in FREE_KEYS}


def plan_groups(configs, size: int, names=None) -> tuple[list[list[int]], dict[int, str]]:
  """Splits run indices into groups of at most `size` runs that can share a program.

  Runs are grouped by the keys outside FREE_KEYS, in the order they first appear; a group is at
  most `size` long. Returns (groups, why): groups in run order (singletons included), and for
  each run that trains alone although size > 1, one line saying why (naming the most similar
  other run by `names`, default "run <index + 1>").
  """
  buckets, why = {}, {}
  for i, config in enumerate(configs):
    reason = alone_reason(config)
    if reason:
      buckets[("alone", i)] = [i]
      why[i] = reason
      continue
    buckets.setdefault(json.dumps(_shared(config), sort_keys=True, default=str), []).append(i)
  groups = []
  for members in buckets.values():
    groups += [members[j:j + size] for j in range(0, len(members), size)]
  shared = {i: _shared(c) for i, c in enumerate(configs) if i not in why}
  for group in groups:
    if len(group) == 1 and group[0] not in why and len(shared) > 1:
      i = group[0]
      others = [j for j in shared if j != i]
      nearest = min(others, key=lambda j: _n_diff(shared[i], shared[j]))
      keys = sorted(k for k in set(shared[i]) | set(shared[nearest])
                    if shared[i].get(k) != shared[nearest].get(k))
      other = names[nearest] if names else f"run {nearest + 1}"
      why[i] = (f"no other run shares its program ({', '.join(keys[:3])} differ from {other})"
                if keys else "its group of the same shape was full")
  groups.sort(key=lambda g: g[0])
  return groups, why


def _n_diff(a: dict, b: dict) -> int:
  return sum(a.get(k) != b.get(k) for k in set(a) | set(b))


# ----------------------------------------------------------------------------------------------
# One group, top to bottom
# ----------------------------------------------------------------------------------------------


def run_group(configs, workdirs) -> list:
  """Runs `configs` side by side, each in its workdir; returns per run its results dict or the
  exception that ended it (a failed run does not stop the others).

  A run whose results.json exists is only read. Ctrl-C / SIGTERM (Preempted, KeyboardInterrupt)
  propagate: every run then has a checkpoint at the step reached, and the same call resumes.
  """
  for config in configs:
    pipeline.validate(config)
  parallel.maybe_initialize_distributed()
  outcomes = [pipeline.finished(os.path.join(w, "results.json"), echo=False) for w in workdirs]
  with contextlib.ExitStack() as stack:
    todo = [k for k, o in enumerate(outcomes) if o is None]
    for k in todo:
      stack.enter_context(parallel.workdir_lock(workdirs[k]))
      files.check_workdir_layout(workdirs[k])
    compile_stats.enable_persistent_cache(
        configs[0].runtime.compile_cache
        or os.path.join(data_lib.cache_root(configs[0].data), "jax_compile"))
    compile_stats.install()
    preps, logs = [], {}
    for k in todo:  # preparing (base model, pruning, measured allocations) goes run by run
      logs[k] = stack.enter_context(_Closing(RunLog(workdirs[k], config=configs[k], echo=False)))
      t0 = time.time()
      try:
        prep = pipeline.prepare(configs[k], workdirs[k], logs[k].log, t0)
      except Exception as e:  # pylint: disable=broad-except
        logs[k].failed, outcomes[k] = True, e
        continue
      preps.append((k, prep, time.time() - t0, compile_stats.since(prep.compiled_before)))
    if preps:
      first = preps[0][1]
      for k, prep, _, _ in [x for x in preps if (x[1].model_cfg, x[1].steps)
                            != (first.model_cfg, first.steps)]:
        # The configs agreed, the checkpoints they load did not: this one trains alone.
        why = "its model shape or step count differs from the group's first run: training alone"
        prep.log.event("batch", why, alone=why)
        preps = [x for x in preps if x[0] != k]
        outcomes[k] = _complete_alone(prep, logs[k])
    if len(preps) == 1:
      k, prep = preps[0][:2]
      outcomes[k] = _complete_alone(prep, logs[k])
    elif preps:
      _side_by_side(preps, outcomes, logs)
  return outcomes


def _complete_alone(prep, log):
  try:
    return pipeline.complete(prep)
  except Exception as e:  # pylint: disable=broad-except
    log.failed = True
    return e


def _side_by_side(preps, outcomes, logs):
  """The shared phases of the prepared runs, then each run's results (its share of the time)."""
  t_shared, before = time.time(), compile_stats.snapshot()
  done = _shared_phases([p for _, p, _, _ in preps])
  shared_s, shared_compiled = time.time() - t_shared, compile_stats.since(before)
  n, names = len(preps), [os.path.basename(p.workdir) for _, p, _, _ in preps]
  for i, ((k, prep, own_s, own_compiled), outcome) in enumerate(zip(preps, done)):
    if isinstance(outcome, Exception):
      logs[k].failed, outcomes[k] = True, outcome
      continue
    params, train_summary, evals, oneshot = outcome
    # The group's compilations are counted once, in its first run.
    compiled = compile_stats.add(own_compiled, shared_compiled) if i == 0 else own_compiled
    outcomes[k] = pipeline.finish(
        prep, params, train_summary, evals, oneshot, seconds=own_s + shared_s / n,
        compiled=compiled, batch={"runs": n, "index": i, "names": names,
                                  "mode": _mode(prep.config), "seconds": round(shared_s, 3)})


class _Closing:
  """A RunLog that closes as failed when its run failed, though the group's block succeeded."""

  def __init__(self, log):
    self.log, self.failed = log, False

  def __enter__(self):
    self.log.__enter__()
    return self

  def __exit__(self, exc_type, exc, tb):
    self.log.close(exit_code=1 if exc_type is not None or self.failed else 0)


def _shared_phases(preps) -> list:
  """One-shot evaluation, fine-tuning and final evaluation of the prepared runs, side by side.
  Per run: (params, train summary, evals, one-shot evals or None), or the exception that
  ended it."""
  config = preps[0].config
  mesh = parallel.data_mesh()
  apply_fn = model_lib.logits_fn(preps[0].model_cfg)
  splits = pipeline.eval_splits(config)
  oneshot = [None] * len(preps)
  wants = [i for i, p in enumerate(preps) if pipeline.wants_oneshot(p)]
  for i, evals in zip(wants, evaluate_group(
      [preps[i] for i in wants], [preps[i].params for i in wants], apply_fn, mesh,
      splits=splits[:1], label="one-shot")):
    oneshot[i] = evals
  trained = [(p.params, dict(pipeline.NO_TRAINING)) for p in preps]
  if preps[0].steps > 0:
    trained = fit_group(preps, total=preps[0].steps, mesh=mesh)
  alive = [i for i, t in enumerate(trained) if not isinstance(t, Exception)]
  finals = evaluate_group([preps[i] for i in alive], [trained[i][0] for i in alive], apply_fn,
                          mesh, splits=splits)
  out = list(trained)
  for i, evals in zip(alive, finals):
    out[i] = (trained[i][0], trained[i][1], evals, oneshot[i])
  return out


def evaluate_group(preps, params, apply_fn, mesh, *, splits, label=""):
  """[{split: evaluate() result}] of each run (its share of the time), one program for all."""
  if len(preps) <= 1:  # a lone run: the one-run program
    return [pipeline.evaluate_splits(p.config, apply_fn, x, p.streams, mesh,
                                     eval_lib.make_eval_step(apply_fn, mesh), p.log, label=label,
                                     splits=splits) for p, x in zip(preps, params)]
  config = preps[0].config
  step = eval_lib.make_eval_step(apply_fn, mesh, batched=_mode(config))
  return pipeline.evaluate_splits(config, apply_fn, stack(params), preps[0].streams, mesh, step,
                                  [p.log for p in preps], label=label, splits=splits,
                                  runs=len(preps))


# ----------------------------------------------------------------------------------------------
# Fine-tuning side by side
# ----------------------------------------------------------------------------------------------


def _mode(config) -> str:
  return parallel.side_by_side_mode(config.sweep.side_by_side)


def stack(trees_):
  """K pytrees of one structure -> one pytree with a leading run axis (on the host)."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees_)


@jax.jit
def _take(tree, k):
  """Run k of a stacked pytree, where it lives (one program for every k)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False), tree)


def union_masks(masks_list, params) -> dict:
  """Masks of every path any run prunes; a run that does not prune a path gets all-True there
  (multiplying by 1 is exact), so that every run's state has one structure."""
  paths = []
  for masks in masks_list:
    paths += [p for p in trees.leaf_paths(masks) if p not in paths]
  out = []
  for masks in masks_list:
    full = {}
    for path in paths:
      own = trees.get_path(masks, path)
      shape = np.shape(trees.get_path(params, path))
      trees.set_path(full, path, np.ones(shape, bool) if own is None else np.asarray(own))
    out.append(full)
  return out


def own_masks(masks, template) -> dict:
  """The paths of `template` (a run's own masks) taken from `masks` (the group's structure)."""
  out = {}
  for path in trees.leaf_paths(template):
    trees.set_path(out, path, trees.get_path(masks, path))
  return out


def fit_group(preps, *, total, mesh) -> list:
  """Fine-tunes the prepared runs side by side for `total` steps with their masks held.

  Returns per run (params, train summary), or the Diverged error that ended it (the others go
  on). Each run saves and resumes its own checkpoints; when they stand at different steps (a
  kill between two runs' saves), the runs continue one at a time from their own.
  """
  config = preps[0].config
  t_cfg, seq_len = config.train, config.data.seq_len
  sequences = data_lib.train_sequences(preps[0].streams.get("train"), seq_len)
  train.check_batch(t_cfg, sequences, mesh, seq_len)
  masks = union_masks([p.masks for p in preps], preps[0].params)
  states, lrs, ckpts, metas = [], [], [], []
  for p, m in zip(preps, masks):
    optimizer, schedule = train.make_optimizer(p.config.train, total)
    lrs.append(train.learning_rates(schedule, total))
    states.append(train.init_state(p.params, optimizer, p.masks, p.config.seed + 1))
    ckpts.append(ckpt_lib.Checkpointer(
        os.path.join(p.workdir, "checkpoints"), keep=p.config.checkpoint.keep,
        every_steps=p.config.checkpoint.every_steps))
    metas.append({"best_perplexity": None, "final_loss": None,
                  "config": train.resume_keys(p.config)})
  try:
    latest = {c.latest_step() for c in ckpts}
    if len(latest) > 1:
      for c in ckpts:
        c.close()
      ckpts = []
      why = (f"checkpoints of the group stand at steps {sorted(latest, key=str)}: training "
             "one at a time from each run's own")
      for p in preps:
        p.log.event("batch", why, alone=why)
      return [_fit_alone(p, total, mesh) for p in preps]
    if latest != {None}:
      for i, (p, c) in enumerate(zip(preps, ckpts)):
        states[i], metas[i] = c.restore(states[i])
        train.check_resumable(metas[i].get("config"), train.resume_keys(p.config), p.workdir)
        p.log.event("resume", f"resumed from step {int(states[i]['step'])} of {total}",
                    step=int(states[i]["step"]))
    states = [dict(s, masks=m) for s, m in zip(states, masks)]
    return _loop(preps, stack(states), np.stack(lrs, axis=1), ckpts, metas, total=total,
                 mesh=mesh, sequences=sequences)
  finally:
    for c in ckpts:
      c.close()  # waits for pending saves


def _fit_alone(p, total, mesh):
  try:
    params, _, summary = train.fit(p.config, p.model_cfg, p.params, p.masks, total=total,
                                   plan=None, streams=p.streams, mesh=mesh, workdir=p.workdir,
                                   log=p.log)
  except train.Diverged as e:
    return e
  return params, summary


def _loop(preps, state, lrs, ckpts, metas, *, total, mesh, sequences):
  """train.fit's loop for a stacked state (lrs: [total, K]); see fit_group."""
  config = preps[0].config
  t_cfg, n = config.train, len(preps)
  accum, tokens_per_step = t_cfg.grad_accum, t_cfg.batch_size * t_cfg.grad_accum * config.data.seq_len
  seeds = [p.config.seed for p in preps]
  step_fn = train.make_train_step(preps[0].model_cfg, train.optimizer_settings(t_cfg), mesh,
                                  batched=_mode(config))
  apply_fn = model_lib.logits_fn(preps[0].model_cfg)
  eval_step = eval_lib.make_eval_step(apply_fn, mesh, batched=_mode(config))
  step = int(state["step"][0])  # every run stands at the same step (fit_group)
  state = parallel.replicate(state, mesh, donatable=True)
  failed = [None] * n  # the Diverged error of a run whose loss became NaN / Inf
  clock = train.Clock(step, n * tokens_per_step)  # the program's throughput: every run's tokens
  window, window_steps, t_saved = None, 0, time.time()

  def save(step, force, metric=None):
    saved = False
    for i, ckpt in enumerate(ckpts):
      if failed[i] is None:
        one = dict(_take(state, i))
        one["masks"] = own_masks(one["masks"], preps[i].masks)
        saved |= ckpt.save(step, one, metas[i], force=force,
                           metric=None if metric is None else metric[i])
    return saved

  with ckpt_lib.PreemptionFlag() as preemption:
    while step < total and not all(failed):
      with train.steady_state_guard():
        batch = np.stack([train.step_batch(sequences, step, accum, t_cfg.batch_size, seed)
                          for seed in seeds])
        state, metrics = step_fn(state, parallel.shard_batch(batch, mesh, axis=2), {},
                                 lrs[step])
        window = metrics if window is None else jax.tree.map(lambda a, b: a + b, window, metrics)
        window_steps += 1
      step += 1
      clock.stepped(step, metrics)
      if step % t_cfg.log_every == 0 or step == total:
        means = {k: np.asarray(v, np.float64) / window_steps
                 for k, v in jax.device_get(window).items()}
        window, window_steps = None, 0
        tok_s, seconds_per_step = clock.since_last(step)
        for i, p in enumerate(preps):
          m = {k: float(v[i]) for k, v in means.items()}
          if failed[i] is not None:
            continue
          if not np.isfinite(m["loss"]):
            failed[i] = train.diverged(step, ckpts[i])
            p.log.event("diverged", str(failed[i]))
            continue
          train.log_train(p.log, m, step=step, total=total, lr=float(lrs[step - 1, i]),
                          tok_s=tok_s, seconds_per_step=seconds_per_step)
          metas[i]["final_loss"] = m["loss"]
      metric = None
      if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step < total:
        results = train.periodic_validation(config, apply_fn, state["params"],
                                            preps[0].streams, mesh, eval_step, runs=n)
        metric = [r["perplexity"] for r in results]
        for p, r, meta in zip(preps, results, metas):
          p.log.metric(step, "validation", loss=r["loss"], perplexity=r["perplexity"])
          p.log.event("validation", f"step {step}: validation perplexity {r['perplexity']:.3f}")
          if meta["best_perplexity"] is None or r["perplexity"] < meta["best_perplexity"]:
            meta["best_perplexity"] = r["perplexity"]
      # The rules of train.fit: a step with a validation metric is always saved, the last one
      # only when redoing the steps since the last save would cost more than final_after_s.
      last = step == total and parallel.agree(
          time.time() - t_saved > config.checkpoint.final_after_s)
      if save(step, force=last or metric is not None, metric=metric):
        t_saved = time.time()
      if preemption.check(step):
        save(step, force=True)
        for ckpt in ckpts:
          ckpt.wait()
        raise train.preempted(preemption, step, [p.log for p in preps],
                              [p.workdir for p in preps])
  jax.block_until_ready(state)
  tok_s = clock.overall(step)
  host = jax.device_get(state["params"])
  out = []
  for i, meta in enumerate(metas):
    if failed[i] is not None:
      out.append(failed[i])
      continue
    out.append((jax.tree.map(lambda x, i=i: x[i], host), {
        "steps": total, "tokens": total * tokens_per_step, "final_loss": meta["final_loss"],
        "best_validation_perplexity": meta["best_perplexity"], "tokens_per_s": tok_s,
        "seconds": (time.time() - clock.t0) / n}))
  return out
