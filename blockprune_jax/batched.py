"""Runs side by side (sweep.batch_runs): K runs of a sweep as one program, around the one-run core.

Runs that differ only in a program's inputs (masks, ratios, seeds, learning rates) share it: the
state gains a leading run axis and the one-run update is mapped over it (`over_runs`). Training
is train.loop with a stacked state and hooks (`Runs`) that fan out to each run's train.Run (its
log and one-run checkpoints: a group's run resumes alone, and the other way round). A run's
times are its preparation plus its share of the group's; throughputs count all runs' tokens.
"""
import dataclasses
import functools
import json
import os

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from blockprune_jax import config_lib
from blockprune_jax import compile_stats
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import keys
from blockprune_jax import lifecycle
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax.prune import pruning
from blockprune_jax import train
from blockprune_jax import trees
from blockprune_jax.errors import UserError

# Keys whose values a batched program takes as inputs: every other key must agree in a group.
FREE_KEYS = keys.where(group=True)


def alone_reason(config) -> str | None:
  """Why this run cannot train side by side with others, or None when it can."""
  p = config.prune
  if p.method != "none" and p.schedule == "gradual":
    return "prune.schedule=gradual changes its masks while training"
  if p.method != "none" and p.when == "after_finetune":
    return "prune.when=after_finetune prunes after training"
  if p.method != "none" and pruning.criterion(p.method).compactable and p.compact:
    return "prune.compact evaluates a model of its own (smaller) shape"
  if config.mesh.fsdp != 1:
    return "mesh.fsdp shards one run's state over the devices"
  if config.distill.teacher:
    return "distillation (distill.teacher) is run one at a time"
  return None


def _shared(config) -> dict:
  return {k: v for k, v in config_lib.flatten(config).items() if k not in FREE_KEYS}


def plan_groups(configs, size: int, names=None) -> tuple[list[list[int]], dict[int, str]]:
  """(groups of at most `size` run indices that agree outside FREE_KEYS, in run order; for each
  run alone, one line why, naming the most similar other run by `names` or "run <index + 1>")."""
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
      nearest = min(others, key=lambda j: len(train.changed_keys(shared[i], shared[j])))
      differ = train.changed_keys(shared[i], shared[nearest])
      other = names[nearest] if names else f"run {nearest + 1}"
      why[i] = (f"no other run shares its program ({', '.join(differ[:3])} differ from {other})"
                if differ else "its group of the same shape was full")
  groups.sort(key=lambda g: g[0])
  return groups, why


def by_shape(preps) -> list:
  """Prepared (index, run) pairs as groups: the first run's model shape and step count together,
  each other one alone (its config agreed, the checkpoint it loads did not)."""
  if not preps:
    return []
  first = preps[0][1]
  same = [(k, p) for k, p in preps if (p.model_cfg, p.steps) == (first.model_cfg, first.steps)]
  alone = [(k, p) for k, p in preps if (p.model_cfg, p.steps) != (first.model_cfg, first.steps)]
  for _, prep in alone:
    why = "its model shape or step count differs from the group's first run: training alone"
    prep.log.event("batch", why, alone=why)
  return [[x] for x in alone] + [same]


def mode(config) -> str:
  setting = config.sweep.side_by_side
  if setting != "auto":
    return setting
  return "map" if jax.default_backend() == "cpu" else "vmap"


def over_runs(fn, in_axes, how: str):
  """`fn` mapped over a leading run axis of the arguments whose `in_axes` entry is 0, as one
  program. "vmap" fills an accelerator one small run leaves idle; "map" (jax.lax.map) runs them
  one after another: on a CPU batched matmuls are slower, one dispatch per step still helps."""
  if how == "vmap":
    return jax.vmap(fn, in_axes=in_axes)
  if how != "map":
    raise ValueError(f"how must be 'vmap' or 'map', got {how!r}")

  def mapped(*args):
    def one(mapped_args):
      it = iter(mapped_args)
      return fn(*(next(it) if axis == 0 else a for a, axis in zip(args, in_axes)))
    return jax.lax.map(one, tuple(a for a, axis in zip(args, in_axes) if axis == 0))
  return mapped


@functools.lru_cache(maxsize=None)
def make_train_step(model_cfg, settings, mesh, how: str):
  """train.make_train_step's update of K runs: the state, batch ([K, accum, B, T + 1]) and
  learning rate ([K]) have a leading run axis, and so do the metrics."""
  if parallel.FSDP in mesh.axis_names:
    raise UserError("sweep.batch_runs > 1 trains replicated runs: set mesh.fsdp=1")
  step = over_runs(train.device_train_step(model_cfg, settings), (0, 0, None, 0), how)
  rep = P()
  step = parallel.shard_map(step, mesh, (rep, P(None, None, parallel.AXIS), rep, rep), (rep, rep))
  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def make_eval_step(apply_fn, mesh, how: str):
  """evaluate.make_eval_step's for K runs' params stacked, scored on the same windows: [K] sums."""
  step = over_runs(eval_lib.device_eval_step(apply_fn, mesh), (0, None, None, None), how)
  spec = P(parallel.batch_axes(mesh))
  return jax.jit(parallel.shard_map(step, mesh, (P(), spec, spec, spec), (P(), P())))


def stack(trees_):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees_)


@jax.jit
def take(tree, k):
  """Run k of a stacked pytree, where it lives (one program for every k)."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False), tree)


def union_masks(masks_list, params) -> list:
  """Each run's masks over every path any run prunes (all-True where it does not: exact), so that
  every run's state has one structure."""
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


class Runs:
  """train.loop's hooks for K runs as one program: each hook fans out to the runs' train.Run."""

  def __init__(self, runs, masks, mesh):
    self.runs, self.masks, self.mesh = runs, masks, mesh
    self.config, self.total, self.n = runs[0].config, runs[0].total, len(runs)
    self.tokens_per_step = self.n * runs[0].tokens_per_step  # the program's: every run's
    self.eval_step = make_eval_step(runs[0].apply_fn, mesh, mode(self.config))
    self.lrs, self.step = None, 0

  def start(self, params, masks) -> dict:
    """The runs' start states (or checkpoints') stacked, with one structure of masks."""
    states = [r.start(p, m) for r, p, m in zip(self.runs, params, masks)]
    self.lrs, self.step = np.stack([r.lrs for r in self.runs], axis=1), self.runs[0].step
    masks = union_masks([s["masks"] for s in states], params[0])
    return stack([dict(s, masks=m) for s, m in zip(states, masks)])

  def stopped(self) -> bool:
    return all(r.stopped() for r in self.runs)

  def before_step(self, state, step):
    return state  # runs that prune while training train alone (alone_reason)

  def inputs(self, step):
    """[K, accum, B, T + 1] (each run's data order from its own seed) and [K] learning rates."""
    batches = np.stack([r.batch(step) for r in self.runs])
    return parallel.shard_batch(batches, self.mesh, axis=2), self.lrs[step]

  def logged(self, step, means, tok_s, seconds_per_step):
    for i, r in enumerate(self.runs):
      if not r.stopped():
        r.logged(step, {k: v[i] for k, v in means.items()}, tok_s, seconds_per_step)

  def periodic_eval(self, state, step):
    if not self.runs[0].eval_due(step) or self.stopped():
      return None
    results = self.runs[0].validation(state["params"], self.eval_step)
    for r, result in zip(self.runs, results):
      r.evaluated(step, result)
    return [result["perplexity"] for result in results]

  def save(self, state, step, *, force, metric=None) -> bool:
    saved = False
    for i, r in enumerate(self.runs):
      if not r.stopped():
        one, masks = dict(take(state, i)), {}
        for path in trees.leaf_paths(self.masks[i]):  # the run's own masks, not the union's
          trees.set_path(masks, path, trees.get_path(one["masks"], path))
        one["masks"] = masks
        saved |= r.save(one, step, force=force, metric=None if metric is None else metric[i])
    return saved

  def preempted(self, preemption, step) -> Exception:
    for r in self.runs:
      r.preempted(preemption, step)
    return train.preempted_error(preemption, step, [r.workdir for r in self.runs])


def fit(preps, *, total, mesh) -> list:
  """train.fit of K prepared runs as one program: per run (params, masks, train summary) or its
  Diverged error. Checkpoints at different steps (a kill between two saves): one at a time."""
  first = preps[0]
  sequences = train.train_sequences(first.config, first.streams, mesh)
  ckpts = [train.checkpointer(p.config, p.workdir) for p in preps]
  try:  # whatever ends training, pending asynchronous saves finish before we leave
    latest = {c.latest_step() for c in ckpts}
    if len(latest) > 1:
      for c in ckpts:
        c.close()
      ckpts = []
      why = (f"checkpoints of the group stand at steps {sorted(latest, key=str)}: training "
             "one at a time from each run's own")
      for p in preps:
        p.log.event("batch", why, alone=why)
      out = []
      for p in preps:
        try:
          out.append(train.fit(p.config, p.model_cfg, p.params, p.masks, p.plan, p.streams,
                               p.workdir, p.log, total=total, mesh=mesh))
        except train.Diverged as e:
          out.append(e)
      return out
    runs = [train.Run(p.config, p.model_cfg, first.streams, sequences, p.workdir, p.log, c,
                      total, mesh, p.plan) for p, c in zip(preps, ckpts)]
    hooks = Runs(runs, [p.masks for p in preps], mesh)
    state = hooks.start([p.params for p in preps], [p.masks for p in preps])
    step_fn = make_train_step(dataclasses.replace(first.model_cfg, remat=first.config.train.remat),
                              train.optimizer_settings(first.config.train), mesh,
                              mode(first.config))
    state, clock = train.loop(hooks, parallel.place_state(state, mesh, donatable=True),
                              step_fn, {})
    params = jax.device_get(state["params"])
    return [r.failed or (jax.tree.map(lambda x, i=i: x[i], params), p.masks,
                         r.summary(clock, share=len(runs)))
            for i, (r, p) in enumerate(zip(runs, preps))]
  finally:
    for c in ckpts:
      c.close()  # waits for pending saves


def complete(preps) -> list:
  """lifecycle.fine_tune of K runs as one program: per run finish's arguments, or its error."""
  mesh = parallel.train_mesh(preps[0].config.mesh.fsdp)
  splits = lifecycle.eval_splits(preps[0].config)
  # What fine-tuning recovers: the first split's perplexity right after pruning.
  oneshot = evaluate(preps, [p.params if lifecycle.wants_oneshot(p) else None for p in preps],
                     mesh, splits[:1], label="one-shot")
  trained = [(p.params, p.masks, dict(lifecycle.NO_TRAINING)) for p in preps]
  if preps[0].steps > 0:
    trained = fit(preps, total=preps[0].steps, mesh=mesh)
  live = [None if isinstance(t, Exception) else t[0] for t in trained]
  return [t if isinstance(t, Exception) else (t[0], t[2], evals, before, None)
          for t, evals, before in zip(trained, evaluate(preps, live, mesh, splits), oneshot)]


def evaluate(preps, params, mesh, splits, label="") -> list:
  """[{split: evaluate.evaluate result}] per run (None where its params are None), the runs
  scored as one program."""
  some = [i for i, x in enumerate(params) if x is not None]
  out = [None if x is None else {} for x in params]
  if len(some) <= 1:
    for i in some:
      out[i] = lifecycle.evaluate_splits(preps[i], params[i], mesh, splits, label=label)
    return out
  n, first = len(some), preps[some[0]]
  apply_fn = model_lib.logits_fn(first.model_cfg)
  step = make_eval_step(apply_fn, mesh, mode(first.config))
  stacked = stack([params[i] for i in some])
  for split in splits:
    results = eval_lib.evaluate(apply_fn, stacked, first.streams.get(split), mesh=mesh,
                                desc=split, step_fn=step, **lifecycle.eval_args(first.config))
    for i, r in zip(some, results):
      out[i][split] = r = dict(r, seconds=r["seconds"] / n, first_batch_s=r["first_batch_s"] / n)
      lifecycle.log_eval(preps[i].log, split, r, label,
                         beside=f"side by side with {n - 1} other run(s), ")
  return out


def share(i, preps, own, shared_s, shared_compiled) -> dict:
  """lifecycle.finish's times of run i: its own (seconds, compilations) plus its share of the
  group's (whose compilations count in its first run)."""
  own_s, own_compiled = own
  n = len(preps)
  return {"seconds": own_s + shared_s / n,
          "compiled": compile_stats.add(own_compiled, shared_compiled) if i == 0 else own_compiled,
          "batch": {"runs": n, "index": i, "names": [os.path.basename(p.workdir) for p in preps],
                    "mode": mode(preps[0].config), "seconds": round(shared_s, 3)}}
