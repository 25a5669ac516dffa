"""Allocations compared seed by seed: runs that differ only in the allocation, paired on seed."""
import itertools
import math
from typing import Sequence

import pandas as pd

from blockprune_jax import keys
from blockprune_jax import trees
from blockprune_jax.report import stats
from blockprune_jax.report.dataframe import as_frame, column, numeric, objects, val_split
from blockprune_jax.report.tables import fmt, fmt_ppl, keyed, markdown

COLUMNS = ["sparsity", "method", "train_steps", "setting", "stage", "split", "allocation_a",
           "allocation_b", "n", "mean", "std", "ci_low", "ci_high", "significant"]
# What a paired comparison lets differ: the seed it pairs on and what tells allocations apart
# (keys.py: paired=True); prune.target gives way to the sparsity level, which explicit ratios
# have too.
_ALLOCATION_KEYS = keys.where(paired=True)


def _paired_runs(df: pd.DataFrame, split: str) -> pd.DataFrame:
  """Pruned runs with a seed, `key`ed so that a group differs only in allocation (and seed)."""
  runs = df[~df["role"].isin(["base", "control"]) & ~df["method"].isin(["", "none"])
            & df["_config"].astype(bool) & df["seed"].notna()]
  level = [t if t is not None else (round(s, 2) if s is not None and math.isfinite(s) else None)
           for t, s in zip(runs["target"], runs["sparsity_overall"])]
  alloc = runs["allocation"]
  ramp = alloc.isin(["linear", "exponential"]) & runs["_config"].map(
      lambda c: trees.get_path(c, ("prune", "direction")) == "decreasing")
  label = alloc.mask(ramp, alloc.astype(str) + " decreasing")  # a front-heavy ramp
  for name, ratios in (("explicit", runs["ratios_per_block"]), ("layer", runs["ratios_per_layer"])):
    label = label.mask(alloc == name, name + " " + ratios)  # told apart by their ratios
  out = runs[["method", "train_steps", "seed"]].join(
      keyed(runs["_config"], _ALLOCATION_KEYS, hide=("prune.method", "train.steps"))).assign(
          sparsity=objects(level, runs.index), allocation=label,
          finetuned=numeric(column(runs, f"ppl_{split}")),
          oneshot=numeric(column(runs, f"oneshot_{split}")))
  return out[out["sparsity"].notna()].sort_values("sparsity", kind="stable")


def _pairs(g: pd.DataFrame, split: str) -> tuple[list[dict], str]:
  """Paired differences between one group's allocations and the sentence on the best one."""
  wide = {stage: g.pivot_table(index="seed", columns="allocation", values=stage, aggfunc="mean")
          for stage in ("finetuned", "oneshot") if g[stage].notna().any()}
  tuned = wide.get("finetuned", pd.DataFrame())
  tuned = tuned.loc[:, tuned.notna().sum() >= 2]  # an allocation needs two seeds or more
  if tuned.shape[1] < 2:
    return [], ""
  ranked = list(tuned.mean().sort_values(kind="stable").index)  # lowest perplexity first
  head = {"split": split, **g.iloc[0][["sparsity", "method", "train_steps", "setting"]]}
  rows = []
  for stage, table in wide.items():
    for a, b in itertools.combinations(ranked, 2):
      both = table.reindex(columns=[a, b]).dropna()
      if len(both) >= 2:
        rows.append({**head, "stage": "fine-tuned" if stage == "finetuned" else "one-shot",
                     "allocation_a": a, "allocation_b": b,
                     **stats.paired_difference(both[a].tolist(), both[b].tolist())})
  steps = "" if head["train_steps"] is None else f", {head['train_steps']} train steps"
  setting = f", {head['setting']}" if head["setting"] else ""
  best = tuned[ranked[0]].dropna()
  sentence = (f"Sparsity {head['sparsity']:g} ({head['method']}{steps}{setting}): {ranked[0]} "
              f"has the lowest fine-tuned {split} perplexity ({fmt_ppl(best.mean())}, mean over "
              f"{len(best)} seeds); ")
  lead = [r for r in rows if (r["stage"], r["allocation_b"]) == ("fine-tuned", ranked[1])
          and r["allocation_a"] == ranked[0]]
  return rows, sentence + (stats.verdict(ranked[0], ranked[1], lead[0], f"{split} perplexity")
                           if lead else f"{ranked[1]}, the runner-up, shares < 2 seeds with it.")


def paired_comparisons(rows) -> tuple[pd.DataFrame, list[str]]:
  """Runs that differ only in the allocation, compared pairwise over their common seeds: rows of
  stats.paired_difference(a, b) of val_split's perplexity, fine-tuned and one-shot, `a` the better
  mean; and per group a sentence on the best allocation and whether its lead is significant."""
  df = as_frame(rows)
  split = val_split(df)
  groups = _paired_runs(df, split).groupby(["sparsity", "method", "key"], sort=False)
  done = [_pairs(g, split) for _, g in groups]
  return (pd.DataFrame([r for rows, _ in done for r in rows], columns=COLUMNS, dtype=object),
          [s for _, s in done if s])


def paired_markdown(paired: pd.DataFrame, sentences: Sequence[str]) -> list[str]:
  """report.md's "Paired comparison" section."""
  def cells(r: dict) -> list[str]:
    ci = "" if r["ci_low"] is None else f"{fmt_ppl(r['ci_low'])} to {fmt_ppl(r['ci_high'])}"
    return [f"{r['sparsity']:g}", r["method"], fmt("train_steps", r["train_steps"]), r["stage"],
            r["allocation_a"], r["allocation_b"], str(r["n"]), fmt_ppl(r["mean"]), ci,
            "yes" if r["significant"] else "no"]
  head = ["sparsity", "method", "train steps", "stage", "A", "B", "seeds", "Δ ppl (A − B)",
          "95 % CI", "significant"]
  return ["", "## Paired comparison", "",
          f"Runs that differ only in the allocation, paired by seed: Δ = {paired['split'][0]} "
          "perplexity of A minus that of B on the same seed, mean over the shared seeds with a "
          "95 % t-interval; A has the lower mean fine-tuned perplexity. One-shot = right after "
          "pruning, before fine-tuning.", "",
          markdown(head, map(cells, paired.to_dict("records"))), ""] + [f"- {s}" for s in
                                                                        sentences]
