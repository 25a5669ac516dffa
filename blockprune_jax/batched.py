"""Runs side by side: which runs of a sweep can be one program (`plan_groups`), and their
pytrees stacked on a leading run axis (`stack`, `take`, `union_masks`, `own_masks`).

Runs of a sweep that differ only in what a program takes as input -- masks, pruning ratios and
method, seeds (data order, dropout), learning-rate values -- can be one program: every leaf of
the training state gains a leading run axis and the one-run update is mapped over it
(`train.make_train_step(batched=...)`, `evaluate.make_eval_step(batched=...)`). With
`jax.vmap` (sweep.side_by_side=vmap, the default on accelerators) K small runs fill an
accelerator that one leaves half idle; on a CPU (map, the default there) `jax.lax.map` runs them
one after another inside the program. Either way the group compiles once.

The group itself runs through the one lifecycle of every run (`pipeline.run_group`, whose
`train.fit` trains K >= 1 runs). What stays per run is exactly what a run has on its own: its
workdir, log, metrics, checkpoints (in the one-run format: a group's run can be resumed alone,
and the other way round), results.json and export. Times in a batched run's results.json are its
share: its own preparation plus the shared phases divided by the group's size, so that the runs'
`runtime.seconds` add up to the wall time; `runtime.batch` names the group and its whole time.
Throughputs (`tokens_per_s`) are the program's, all runs' tokens counted.
"""
import json

import jax
import numpy as np

from blockprune_jax import config_lib
from blockprune_jax import keys
from blockprune_jax import parallel
from blockprune_jax.prune import pruning
from blockprune_jax import trees

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
  if config.mesh.fsdp != 1:
    return "mesh.fsdp shards one run's state over the devices"
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
      differ = sorted(k for k in set(shared[i]) | set(shared[nearest])
                    if shared[i].get(k) != shared[nearest].get(k))
      other = names[nearest] if names else f"run {nearest + 1}"
      why[i] = (f"no other run shares its program ({', '.join(differ[:3])} differ from {other})"
                if differ else "its group of the same shape was full")
  groups.sort(key=lambda g: g[0])
  return groups, why


def _n_diff(a: dict, b: dict) -> int:
  return sum(a.get(k) != b.get(k) for k in set(a) | set(b))


# ----------------------------------------------------------------------------------------------
# Stacking: K runs' pytrees as one with a leading run axis
# ----------------------------------------------------------------------------------------------


def mode(config) -> str:
  """How the program maps over the runs: sweep.side_by_side resolved for this backend."""
  return parallel.side_by_side_mode(config.sweep.side_by_side)


def stack(trees_):
  """K pytrees of one structure -> one pytree with a leading run axis (on the host)."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees_)


@jax.jit
def take(tree, k):
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
