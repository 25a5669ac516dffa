"""Tables and plots from finished runs: every results.json under the given directories.

    python -m blockprune_jax.report runs/grid [runs/other ...] [--out=DIR]

One pandas DataFrame with a row per results.json (`frame`) is the source of everything written
into the first directory (or --out): `report.csv`, `report.md` (with a mean ± std section for runs
that differ only in their seed and a paired comparison of allocations over seeds),
`report_seeds.csv`, `report_paired.csv` and, where the runs allow them, `ppl_vs_sparsity.png`,
`heatmap_mid<r>.png` (3-block explicit-ratio grids, one per middle ratio), `layer_scan.png` (one
layer pruned at a time) and `training_curves.png`. Prints the Markdown table. Every number comes
from results.json / metrics.jsonl; a missing field is a blank cell.

Optional fields add columns: `oneshot.perplexity.<split>` (right after pruning, before
fine-tuning) gives `oneshot_<split>`; a dense control run (`role: control`, fine-tuned like the
others) gives every run `delta_<split>` = its perplexity minus the control's. Zero-shot task
scores (`tasks.<task>.<metric>`, eval.tasks) give `<task>/<metric>` columns (`lambada_openai/acc`),
one-shot ones (`oneshot_tasks`) `oneshot/<task>/<metric>`; stderrs stay in results.json.
"""
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from blockprune_jax import config_lib
from blockprune_jax import files
from blockprune_jax import keys
from blockprune_jax.report import stats
from blockprune_jax import trees
from blockprune_jax.errors import NoSpace, UserError

log = logging.getLogger(__name__)

RESULTS = "results.json"
METRICS = "metrics.jsonl"
# Allocations solved for prune.target (generated or measured on the model).
_GENERATED = ("uniform", "linear", "exponential", "owl", "sensitivity", "search")
_SKIP_DIRS = {"checkpoints", "checkpoint", "ckpt", "export", "tensorboard", "tb"}
_PPL = ("ppl_", "oneshot_", "delta_")  # prefixes of the perplexity columns, in table order
_ONESHOT_TASKS = "oneshot/"  # prefix of the one-shot task columns; every task column has a '/'

# ----------------------------------------------------------------------------------------------
# One DataFrame from the results.json files
# ----------------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
  if isinstance(x, bool) or x is None:
    return None
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def _nums(xs: Any) -> list[float] | None:
  out = [_num(x) for x in xs] if isinstance(xs, (list, tuple)) else []
  return None if not out or None in out else out


def _slash(xs: Sequence[float] | None, fmt: str = "{:g}") -> str:
  return "/".join(fmt.format(x) for x in xs) if xs else ""


def _natural_key(text: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_results(paths: Iterable[str]) -> list[tuple[str, str]]:
  """(root, run_dir) for every results.json under each path (a path may be a run dir itself)."""
  found = []
  for root in paths:
    if os.path.isfile(root) and os.path.basename(root) == RESULTS:
      found.append((os.path.dirname(root) or ".", os.path.dirname(root) or "."))
      continue
    if not os.path.isdir(root):
      log.warning("report: %s is not a directory, skipped", root)
      continue
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
      if RESULTS in filenames:
        found.append((root, dirpath))
  return found


def _load(path: str) -> dict | None:
  """The JSON object in `path`, or None (with a warning): one bad file must not stop a report."""
  try:
    with open(path) as f:
      results = json.load(f)
    if isinstance(results, dict):
      return results
    log.warning("report: skipping %s: not a JSON object", path)
  except (OSError, ValueError) as e:
    log.warning("report: skipping %s: %s", path, e)
  return None


def _ppls(d: Any) -> dict[str, float | None]:
  return {str(k): _num(v) for k, v in d.items()} if isinstance(d, dict) else {}


def _record(results: dict, run: str, run_dir: str) -> dict:
  """One row; keys starting with '_' feed plots and grouping, not the tables."""
  cfg = results.get("config") if isinstance(results.get("config"), dict) else {}
  pruning = results.get("pruning") if isinstance(results.get("pruning"), dict) else {}
  method = pruning.get("method", trees.get_path(cfg, ("prune", "method")))
  allocation = pruning.get("allocation", trees.get_path(cfg, ("prune", "allocation")))
  # Older results.json lack the solved ratios; for explicit / layer runs they are the config's.
  cfg_ratios = _nums(trees.get_path(cfg, ("prune", "ratios")))
  ratios_block = _nums(pruning.get("ratios_per_block")) or (
      cfg_ratios if allocation == "explicit" else None)
  ratios_layer = _nums(pruning.get("ratios_per_layer")) or (
      cfg_ratios if allocation == "layer" else None)
  target = _num(trees.get_path(cfg, ("prune", "target")))
  if method in (None, "none") or allocation not in _GENERATED:
    target = None  # a config default that the run did not use; a blank says so
  ppl = _ppls(results.get("perplexity"))
  val = ppl.get("validation", next(iter(ppl.values()), None))  # else the first split's
  return {
      "run": run,
      "role": "control" if "control" in (results.get("role"), cfg.get("role"))
              else results.get("role", ""),
      "method": method if method is not None else "",
      "allocation": allocation if allocation is not None else "",
      "target": target,
      "ratios_per_block": _slash(ratios_block),
      "ratios_per_layer": _slash(ratios_layer) if allocation == "layer" else "",
      "sparsity_overall": _num(trees.get_path(results, ("sparsity", "overall"))),
      "sparsity_per_block": _slash(_nums(trees.get_path(results, ("sparsity", "per_block"))),
                                   "{:.6g}"),
      "seed": trees.get_path(cfg, ("seed",), results.get("seed")),
      "train_steps": trees.get_path(results, ("train", "steps")),
      "final_train_loss": _num(trees.get_path(results, ("train", "final_loss"))),
      "_dir": run_dir,
      "_ppl": ppl,
      "_oneshot": _ppls(trees.get_path(results, ("oneshot", "perplexity"))),
      "_tasks": _task_scores(results.get("tasks")),
      "_oneshot_tasks": _task_scores(results.get("oneshot_tasks"), _ONESHOT_TASKS),
      "_val": val if val is not None and math.isfinite(val) and val > 0 else None,  # plottable
      "_ratios_block": ratios_block,
      "_ratios_layer": ratios_layer,
      "_config": cfg,
  }


def _task_scores(tasks: Any, prefix: str = "") -> dict:
  """{'<prefix><task>/<metric>': value} of results.json's task scores, stderrs left out."""
  if not isinstance(tasks, dict):
    return {}
  return {f"{prefix}{task}/{metric}": _num(value)
          for task, metrics in tasks.items() if isinstance(metrics, dict)
          for metric, value in metrics.items() if not metric.endswith("_stderr")}


def _is_task_column(col: str) -> bool:
  return "/" in col


def _splits(names: Iterable[str]) -> list[str]:
  seen = set(names)
  order = [s for s in ("validation", "test") if s in seen]
  return order + sorted(seen - set(order))


def _objects(values: Iterable[Any], index) -> pd.Series:
  """A column of Python objects: None stays None (not NaN) and ints stay ints."""
  return pd.Series(list(values), index=index, dtype=object)


def frame(paths: Sequence[str]) -> pd.DataFrame:
  """The runs under `paths`, one row each, sorted by run name: every table and plot reads this.

  `run` is the run directory relative to its root (prefixed with the root's name when several
  roots are given). Perplexities are `ppl_<split>` columns, one-shot ones `oneshot_<split>`, the
  difference to a dense control `delta_<split>`; `role` is results.json's `role` ("base" for the
  shared from-scratch base model, "control" for a dense control). Cells hold Python objects with
  None for a blank, so a NaN perplexity (a diverged run) stays distinct from a missing one.
  """
  records = []
  for root, run_dir in find_results(paths):
    results = _load(os.path.join(run_dir, RESULTS))
    if results is not None:
      rel = os.path.relpath(run_dir, root)
      base = os.path.basename(os.path.abspath(root))
      run = base if rel == "." else (os.path.join(base, rel) if len(paths) > 1 else rel)
      records.append(_record(results, run, run_dir))
  records.sort(key=lambda r: _natural_key(r["run"]))
  df = pd.DataFrame(records, columns=list(_record({}, "", "")), dtype=object)
  for source, prefix in (("_ppl", "ppl_"), ("_oneshot", "oneshot_")):
    for s in _splits(s for d in df[source] for s in d):
      df[prefix + s] = _objects((d.get(s) for d in df[source]), df.index)
  for source in ("_tasks", "_oneshot_tasks"):
    for col in sorted({c for d in df[source] for c in d}):
      df[col] = _objects((d.get(col) for d in df[source]), df.index)
  return _add_deltas(df)


def _control_ppl(run: pd.Series, controls: pd.DataFrame, col: str) -> float | None:
  """The control of the run's seed, else the mean over controls; controls fine-tuned for the
  run's number of steps first (a control is the dense model trained like the pruned runs)."""
  same = controls[controls["train_steps"] == run["train_steps"]]
  controls = same if len(same) else controls
  same = controls[controls["seed"] == run["seed"]]
  values = _numeric((same if len(same) else controls)[col]).dropna()
  return float(values.mean()) if len(values) else None


def _delta(run: pd.Series, controls: pd.DataFrame, col: str) -> float | None:
  if run["role"] == "base" or run[col] is None:
    return None  # the base is another model (trained from scratch): no comparison
  if run["role"] == "control":
    return 0.0
  ref = _control_ppl(run, controls, col)
  return None if ref is None else run[col] - ref


def _add_deltas(df: pd.DataFrame) -> pd.DataFrame:
  """delta_<split> = perplexity minus the dense control's, when there is a control run."""
  if not (df["role"] == "control").any():
    return df
  for col in [c for c in df.columns if c.startswith("ppl_")]:
    controls = df[(df["role"] == "control") & _numeric(df[col]).notna()]
    df["delta_" + col[4:]] = _objects((_delta(r, controls, col) for _, r in df.iterrows()),
                                      df.index)
  return df


def _as_frame(rows) -> pd.DataFrame:
  """`rows` as a frame: callers may still pass collect()'s list of dicts."""
  return rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), dtype=object)


def collect(paths: Sequence[str]) -> list[dict]:
  """`frame(paths)` as a list of dicts, one per run (None for a blank)."""
  return frame(paths).to_dict("records")


def _column(df: pd.DataFrame, name: str) -> pd.Series:
  """df[name], or blanks where no run has that column."""
  return df[name] if name in df.columns else _objects([None] * len(df), df.index)


def _numeric(column) -> pd.Series:
  """Floats to compute with: blanks and ±inf become NaN (no mean or difference has them)."""
  x = pd.to_numeric(pd.Series(column, dtype=object), errors="coerce").astype(float)
  return x.where(np.isfinite(x))


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _columns(df: pd.DataFrame) -> list[str]:
  head = ["run", "role", "method", "allocation", "target", "ratios_per_block"]
  if any(df.get("ratios_per_layer", [])):  # only layer-allocation runs have their own
    head.append("ratios_per_layer")
  head += ["sparsity_overall", "sparsity_per_block"]
  head += [c for p in _PPL for c in df.columns if c.startswith(p)]
  head += _task_columns(df)
  return head + ["seed", "train_steps", "final_train_loss"]


def _task_columns(df: pd.DataFrame) -> list[str]:
  """The task score columns: final ones first, then the one-shot ones."""
  cols = [c for c in df.columns if _is_task_column(c)]
  return ([c for c in cols if not c.startswith(_ONESHOT_TASKS)]
          + [c for c in cols if c.startswith(_ONESHOT_TASKS)])


def _fmt_ppl(x: float | None) -> str:
  if x is None:
    return ""
  if not math.isfinite(x) or abs(x) >= 1e6:
    return f"{x:.2e}"  # the 1e70 perplexities of a broken loss stay one short cell
  return f"{x:.2f}"


_FORMATS = {"sparsity_overall": "{:.3f}".format, "final_train_loss": "{:.4f}".format,
            "target": "{:g}".format,
            "sparsity_per_block": lambda v: "/".join(f"{float(x):.3f}" for x in v.split("/"))}


def _fmt_md(col: str, value: Any) -> str:
  if value is None or value == "":
    return ""
  if _is_task_column(col):
    return f"{value:.4f}"
  return (_fmt_ppl if col.startswith(_PPL) else _FORMATS.get(col, str))(value)


_HEADERS = {"ratios_per_block": "ratios (per block)", "ratios_per_layer": "ratios (per layer)",
            "sparsity_overall": "sparsity", "sparsity_per_block": "sparsity per block",
            "train_steps": "train steps", "final_train_loss": "final train loss",
            "ppl_": "ppl ", "oneshot_": "one-shot ppl ", "delta_": "Δ ppl "}


def _header(col: str) -> str:
  prefix = next((p for p in _PPL if col.startswith(p)), None)
  return _HEADERS[prefix] + col[len(prefix):] if prefix else _HEADERS.get(col, col)


def _md_lines(head: Sequence[str], cells: Iterable[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def markdown_table(rows, columns: Sequence[str] | None = None) -> str:
  """A GitHub Markdown table: perplexities to 2 decimals, sparsities to 3."""
  df = _as_frame(rows)
  columns = list(columns or _columns(df))
  return _md_lines([_header(c) for c in columns],
                   ([_fmt_md(c, r.get(c)) for c in columns] for r in df.to_dict("records")))


def _control_first(df: pd.DataFrame) -> pd.DataFrame:
  """The dense control on top: the other rows read against it."""
  return df.sort_values("role", key=lambda role: role != "control", kind="stable")


def _write_csv(path: str, table: pd.DataFrame, columns: Sequence[str]) -> None:
  """Floats in full (repr), blanks for None, CRLF rows as the csv module writes them."""
  cells = table[list(columns)].apply(lambda column: column.map(
      lambda v: "" if v is None else (repr(v) if isinstance(v, float) else v)))
  with files.atomic_path(path) as tmp:  # a killed report never leaves half a table
    cells.to_csv(tmp, index=False, lineterminator="\r\n")


def _flatten(d: dict, skip: Iterable[str] = ()) -> dict:
  """{"a.b": JSON of the value} of a nested dict, without the dotted keys in `skip`."""
  return {k: json.dumps(v, sort_keys=True) for k, v in config_lib.flatten(d).items()
          if k not in skip}


def _keyed(configs: pd.Series, skip: Iterable[str], hide: Iterable[str] = ()) -> pd.DataFrame:
  """Per run: `key`, equal for configs equal but for `skip`, and `setting`, the keys that vary
  between the runs (minus `hide`) with their values."""
  flats = configs.map(lambda c: _flatten(c, skip=skip))
  keys = set().union(*flats) if len(flats) else set()
  varying = sorted(k for k in keys - set(hide) if len({f.get(k) for f in flats}) > 1)
  return pd.DataFrame({
      "key": flats.map(lambda f: json.dumps(f, sort_keys=True)),
      "setting": flats.map(lambda f: ", ".join(f"{k}={json.loads(f[k])}" for k in varying
                                               if k in f))}, index=configs.index)


# ----------------------------------------------------------------------------------------------
# Mean ± std over seeds
# ----------------------------------------------------------------------------------------------


def _metrics(df: pd.DataFrame) -> list[str]:
  return (["sparsity_overall"] + [c for c in _columns(df) if c.startswith(_PPL)]
          + _task_columns(df) + ["final_train_loss"])


def _fmean(values: pd.Series) -> float | None:
  """fmean (an exact sum, as the full-precision CSV shows it) of the finite values."""
  vals = [v for v in values if v is not None and math.isfinite(v)]
  return statistics.fmean(vals) if vals else None


def _stdev(values: pd.Series) -> float | None:
  vals = [v for v in values if v is not None and math.isfinite(v)]
  return statistics.stdev(vals) if len(vals) > 1 else None


def _seed_table(df: pd.DataFrame) -> pd.DataFrame:
  """One row per group of runs whose configs differ only in `seed` (two seeds or more)."""
  runs = df[(df["role"] != "base") & df["_config"].astype(bool)]
  runs = runs.join(_keyed(runs["_config"], skip={"seed"}))
  table = runs.groupby("key", sort=False).agg(
      setting=("setting", "first"), method=("method", "first"),
      allocation=("allocation", "first"), target=("target", "first"),
      ratios_per_block=("ratios_per_block", "first"), n=("run", "size"),
      seeds=("seed", lambda s: "/".join(str(x) for x in sorted(set(s), key=str))),
      **{f"{m}_{stat}": (m, fn) for m in _metrics(df)
         for stat, fn in (("mean", _fmean), ("std", _stdev))})
  table = table[runs.groupby("key", sort=False)["seed"].agg(lambda s: len(set(s)) > 1)
                .astype(bool)]
  return table.reset_index(drop=True).astype(object).replace({np.nan: None})


def seed_groups(rows) -> list[dict]:
  """Runs that differ only in `seed`, with mean ± std (sample std, n-1) of their numbers.

  Runs are grouped by their whole resolved config minus `seed`; only groups with two or more
  distinct seeds are returned.
  """
  return _seed_table(_as_frame(rows)).to_dict("records")


def _seed_markdown(seeds: pd.DataFrame, metrics: Sequence[str]) -> str:
  cols = ["setting", "method", "allocation", "target", "ratios_per_block", "n", "seeds"]

  def cell(g: dict, m: str) -> str:
    mean, std = _fmt_md(m, g[f"{m}_mean"]), _fmt_md(m, g[f"{m}_std"])
    return f"{mean} ± {std}" if mean and std else mean

  return _md_lines([_header(c) for c in cols] + [_header(m) + " (mean ± std)" for m in metrics],
                   ([_fmt_md(c, g[c]) for c in cols] + [cell(g, m) for m in metrics]
                    for g in seeds.to_dict("records")))


# ----------------------------------------------------------------------------------------------
# Paired comparison of allocations over seeds
# ----------------------------------------------------------------------------------------------

_PAIRED_COLUMNS = ["sparsity", "method", "train_steps", "setting", "stage", "split",
                   "allocation_a", "allocation_b", "n", "mean", "std", "ci_low", "ci_high",
                   "significant"]
# What a paired comparison lets differ: the seed it pairs on and what tells allocations apart
# (keys.py: paired=True); prune.target gives way to the sparsity level, which explicit
# ratios have too. The shape parameters of the generated allocations are part of the
# allocation's name where they are not the default.
_ALLOCATION_KEYS = keys.where(paired=True)


def _allocation_label(allocation: str, config: dict) -> str:
  """'linear' or, for a front-heavy ramp, 'linear decreasing'."""
  prune = config.get("prune", {}) if isinstance(config, dict) else {}
  if allocation in ("linear", "exponential") and prune.get("direction") == "decreasing":
    return f"{allocation} decreasing"
  return allocation


def _val_split(df: pd.DataFrame) -> str:
  splits = [c[4:] for c in df.columns if c.startswith("ppl_")]
  return "validation" if "validation" in splits or not splits else splits[0]


def _paired_runs(df: pd.DataFrame, split: str) -> pd.DataFrame:
  """Pruned runs with a seed, `key`ed so that a group differs only in allocation (and seed)."""
  runs = df[~df["role"].isin(["base", "control"]) & ~df["method"].isin(["", "none"])
            & df["_config"].astype(bool) & df["seed"].notna()]
  level = [t if t is not None else (round(s, 2) if s is not None and math.isfinite(s) else None)
           for t, s in zip(runs["target"], runs["sparsity_overall"])]
  ratios = {"explicit": runs["ratios_per_block"], "layer": runs["ratios_per_layer"]}
  label = pd.Series([_allocation_label(a, c) for a, c in zip(runs["allocation"], runs["_config"])],
                    index=runs.index, dtype=object)  # explicit and layer: told apart by ratios
  for name, r in ratios.items():
    label = label.mask(runs["allocation"] == name, name + " " + r)
  out = runs[["method", "train_steps", "seed"]].join(
      _keyed(runs["_config"], _ALLOCATION_KEYS, hide=("prune.method", "train.steps"))).assign(
          sparsity=_objects(level, runs.index), allocation=label,
          finetuned=_numeric(_column(runs, f"ppl_{split}")),
          oneshot=_numeric(_column(runs, f"oneshot_{split}")))
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
              f"has the lowest fine-tuned {split} perplexity ({_fmt_ppl(best.mean())}, mean over "
              f"{len(best)} seeds); ")
  lead = [r for r in rows if (r["stage"], r["allocation_b"]) == ("fine-tuned", ranked[1])
          and r["allocation_a"] == ranked[0]]
  return rows, sentence + (stats.verdict(ranked[0], ranked[1], lead[0], f"{split} perplexity")
                           if lead else f"{ranked[1]}, the runner-up, shares < 2 seeds with it.")


def paired_comparisons(rows) -> tuple[pd.DataFrame, list[str]]:
  """Runs that differ only in `prune.allocation`, compared pairwise over their common seeds.

  A group shares the method, the sparsity (prune.target, else the measured overall sparsity to 2
  decimals), the train steps and every other config key; its allocations with two seeds or more
  are compared. A row is stats.paired_difference(a, b) of the validation perplexity (else the
  first split's), fine-tuned and, where logged, one-shot (right after pruning); `a` is the
  allocation with the lower mean fine-tuned perplexity. Returns (rows, one sentence per group on
  the best allocation and whether its lead over the runner-up is significant).
  """
  df = _as_frame(rows)
  split = _val_split(df)
  groups = _paired_runs(df, split).groupby(["sparsity", "method", "key"], sort=False)
  done = [_pairs(g, split) for _, g in groups]
  return (pd.DataFrame([r for rows, _ in done for r in rows], columns=_PAIRED_COLUMNS,
                       dtype=object), [s for _, s in done if s])


def _paired_markdown(paired: pd.DataFrame, sentences: Sequence[str]) -> list[str]:
  def cells(r: dict) -> list[str]:
    ci = "" if r["ci_low"] is None else f"{_fmt_ppl(r['ci_low'])} to {_fmt_ppl(r['ci_high'])}"
    return [f"{r['sparsity']:g}", r["method"], _fmt_md("train_steps", r["train_steps"]),
            r["stage"], r["allocation_a"], r["allocation_b"], str(r["n"]), _fmt_ppl(r["mean"]),
            ci, "yes" if r["significant"] else "no"]

  head = ["sparsity", "method", "train steps", "stage", "A", "B", "seeds", "Δ ppl (A − B)",
          "95 % CI", "significant"]
  return ["", "## Paired comparison", "",
          f"Runs that differ only in the allocation, paired by seed: Δ = {paired['split'][0]} "
          "perplexity of A minus that of B on the same seed, mean over the shared seeds with a "
          "95 % t-interval; A has the lower mean fine-tuned perplexity. One-shot = right after "
          "pruning, before fine-tuning.", "",
          _md_lines(head, map(cells, paired.to_dict("records"))), ""] + [f"- {s}" for s in
                                                                         sentences]


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only; no display on a TPU VM or cluster node
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _spread(values: Iterable[float]) -> float:
  values = [v for v in values if v and v > 0]
  return max(values) / min(values) if values else 1.0


def _with_val(df: pd.DataFrame) -> pd.DataFrame:
  """The runs with a plottable perplexity, as float column `val`."""
  return df[df["_val"].notna()].assign(val=lambda d: d["_val"].astype(float))


def _dense_line(ax, dense: pd.DataFrame, style: str) -> float | None:
  """The unpruned runs' mean perplexity as a horizontal line (None without such runs)."""
  if dense.empty:
    return None
  y = dense["val"].mean()
  ax.axhline(y, color="k", linestyle=style, label=f"unpruned ({y:.2f})")
  return y


def _save(fig, path: str) -> str:
  fig.tight_layout()
  with files.atomic_path(path) as tmp:  # the format comes from `path`, not the temporary name
    fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1].lstrip(".") or "png")
  _pyplot().close(fig)
  return path


def plot_ppl_vs_sparsity(rows, path: str) -> str | None:
  """Validation perplexity vs measured overall sparsity, one series per (method,) allocation."""
  df = _with_val(_as_frame(rows))
  pruned = df[(df["method"] != "none") & df["sparsity_overall"].notna()]
  if pruned.empty:
    return None
  labels = pruned["allocation"].replace("", "?")
  if pruned["method"].nunique() > 1:
    labels = pruned["method"] + " / " + labels
  fig, ax = _pyplot().subplots(figsize=(7.5, 5))
  for i, (label, g) in enumerate(pruned.groupby(labels)):
    g = g.sort_values("sparsity_overall", kind="stable")
    generated = any(a in label for a in _GENERATED)  # ordered by target: a line reads well
    ax.plot(g["sparsity_overall"].astype(float), g["val"], marker="osD^v<>PX*h"[i % 11],
            linestyle="-" if generated else "none", alpha=0.85, label=f"{label} ({len(g)} runs)")
  _dense_line(ax, df[df["method"] == "none"], ":")
  log_y, split = _spread(df["val"]) > 10, _val_split(df)
  ax.set(yscale="log" if log_y else "linear",
         title=f"{split.capitalize()} perplexity vs measured sparsity",
         xlabel="measured sparsity of the pruned matrices (fraction of weights = 0)",
         ylabel=f"{split} perplexity (exp of mean NLL per token)"
         + (", log scale" if log_y else ""))
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, title="allocation")
  return _save(fig, path)


def plot_heatmaps(rows, out_dir: str) -> dict[str, str]:
  """For 3-block explicit-ratio grids: validation perplexity over (front, back), per middle ratio.

  Runs with the same ratios (seeds) are averaged. A middle ratio needs at least 2 front and 2 back
  ratios to be drawn. Returns {"heatmap_mid<r>[_<method>]": path}.
  """
  df = _as_frame(rows)
  grid = _with_val(df[(df["allocation"] == "explicit")
                      & df["_ratios_block"].map(lambda r: bool(r) and len(r) == 3)])
  grid = grid.join(pd.DataFrame(grid["_ratios_block"].tolist(), index=grid.index,
                                columns=["front", "mid", "back"]).round(6))
  written, methods = {}, grid["method"].nunique()
  for (method, mid), g in grid.groupby(["method", "mid"]):
    z = g.pivot_table(index="front", columns="back", values="val", aggfunc="mean")
    if min(z.shape) >= 2:
      name = f"heatmap_mid{mid:g}" + (f"_{method}" if methods > 1 else "")
      written[name] = _heatmap(z, f"middle block ratio = {mid:g}\n({method}; grey = not run)",
                               _val_split(df), os.path.join(out_dir, name + ".png"))
  return written


def _heatmap(z: pd.DataFrame, title: str, split: str, path: str) -> str:
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  values = z.to_numpy()
  log_scale = _spread(values[np.isfinite(values)]) > 10
  fig, ax = _pyplot().subplots(figsize=(1.0 * z.shape[1] + 3, 0.8 * z.shape[0] + 2.2))
  cmap = _pyplot().get_cmap("viridis_r").with_extremes(bad="lightgrey")
  im = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap=cmap, aspect="auto",
                 norm=colors.LogNorm() if log_scale else None)
  ax.set_xticks(range(z.shape[1]), [f"{b:g}" for b in z.columns])
  ax.set_yticks(range(z.shape[0]), [f"{f:g}" for f in z.index])
  ax.set(xlabel="back block pruning ratio (fraction of weights removed)",
         ylabel="front block pruning ratio")
  ax.set_title(f"{split.capitalize()} perplexity, {title}", fontsize=10)
  if values.size <= 100:
    for (i, j), v in np.ndenumerate(values):
      if np.isfinite(v):  # white text on the dark end of the colour scale
        ax.text(j, i, _fmt_ppl(float(v)), ha="center", va="center", fontsize=7,
                color="white" if im.norm(v) > 0.6 else "black")
  fig.colorbar(im, ax=ax, label=f"{split} perplexity" + (" (log scale)" if log_scale else ""))
  return _save(fig, path)


def _single_layer(ratios: Sequence[float] | None) -> int | None:
  nonzero = [i for i, x in enumerate(ratios or ()) if x != 0]
  return nonzero[0] if len(nonzero) == 1 else None


def plot_layer_scan(rows, path: str) -> str | None:
  """Bars of validation perplexity per layer for `layer` runs that prune exactly one layer."""
  df = _as_frame(rows)
  scan = _with_val(df[df["allocation"] == "layer"])
  scan = scan.assign(layer=scan["_ratios_layer"].map(_single_layer)).dropna(subset=["layer"])
  if scan.empty:
    return None
  scan["ratio"] = [round(r[int(l)], 6) for r, l in zip(scan["_ratios_layer"], scan["layer"])]
  bars = scan.pivot_table(index="layer", columns="ratio", values="val", aggfunc="mean")
  bars.index = bars.index.astype(int)
  bars.columns = [f"one layer pruned to {r:g}" for r in bars.columns]
  dense = _with_val(df[(df["role"] != "base") & ((df["method"] == "none") | df[
      "_ratios_layer"].map(lambda r: bool(r) and not any(r)))])
  # Compare like with like: the unpruned runs fine-tuned as long as the scan, if any.
  same = dense[dense["train_steps"].isin(set(df.loc[df["allocation"] == "layer", "train_steps"]))]
  fig, ax = _pyplot().subplots(figsize=(max(6, 0.6 * len(bars) + 3), 4.5))
  bars.plot.bar(ax=ax, width=0.8, rot=0)
  if bars.size <= 40:
    for drawn in ax.containers:
      ax.bar_label(drawn, labels=[_fmt_ppl(v) if np.isfinite(v) else "" for v in
                                  drawn.datavalues], fontsize=7, padding=1)
  y = _dense_line(ax, same if len(same) else dense, "--")
  ys = np.append(bars.to_numpy().ravel(), np.nan if y is None else y)
  lo, hi = np.nanmin(ys), np.nanmax(ys)
  pad = max((hi - lo) * 0.15, hi * 0.01)
  split = _val_split(df)
  ax.set(ylim=(max(0, lo - 3 * pad), hi + 2 * pad),  # zoomed: the differences are small
         xlabel="pruned layer (index, 0 = closest to the embeddings)",
         ylabel=f"{split} perplexity (axis does not start at 0)",
         title=f"{split.capitalize()} perplexity when pruning a single layer")
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  return _save(fig, path)


def _sensitivity(run_dir: str):
  """A run's measured sensitivity curves (results.json pruning.sensitivity), or None."""
  try:
    with open(os.path.join(run_dir, RESULTS)) as f:
      sens = (json.load(f).get("pruning") or {}).get("sensitivity")
    return sens if sens and sens.get("grid") and sens.get("loss_increase") else None
  except (OSError, ValueError, AttributeError):
    return None


def plot_sensitivity(rows, path: str) -> str | None:
  """The curves `sensitivity` (and `search`) allocations were solved from: calibration-loss
  increase when one block alone is pruned, per block, one faint line per run."""
  df = _as_frame(rows)
  found = [c for c in map(_sensitivity, df["_dir"]) if c]
  if not found:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for curves in found:
    for b, losses in enumerate(curves["loss_increase"]):
      ax.plot([0.0] + list(curves["grid"]), [0.0] + list(losses), marker=".", alpha=0.6,
              color=colors[b % len(colors)], label=f"block {b}" if curves is found[0] else None)
  ax.set(xlabel="ratio of the block alone", ylabel="calibration loss increase (nats)",
         title=f"Sensitivity curves ({len(found)} run{'s' if len(found) > 1 else ''})")
  ax.legend(fontsize=8)
  ax.grid(True, alpha=0.3)
  return _save(fig, path)


def read_metrics(path: str) -> list[dict]:
  """The JSON lines of a metrics.jsonl; bad lines (a run killed mid-write) are skipped."""
  out = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if isinstance(rec, dict) and _num(rec.get("step")) is not None:
          out.append(rec)
  except OSError:
    pass
  return out


def _curves(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(train loss, validation perplexity) by step from a run's metrics.jsonl."""
  m = pd.DataFrame(read_metrics(os.path.join(run_dir, METRICS)),
                   columns=["step", "split", "loss", "perplexity"])
  m["step"], m["loss"] = _numeric(m["step"]), _numeric(m["loss"])
  # perplexity is exp(mean NLL) by definition; exp overflows past a loss of ~700
  m["ppl"] = _numeric(m["perplexity"]).fillna(np.exp(m["loss"].where(m["loss"] < 700)))
  train = m[(m["split"] == "train") & m["loss"].notna()].sort_values(["step", "loss"])
  return train, m[(m["split"] == "validation") & m["ppl"].notna()].sort_values(["step", "ppl"])


def plot_training_curves(rows, path: str) -> str | None:
  """Train loss vs step and (where logged) validation perplexity vs step, one line per run."""
  df = _as_frame(rows)
  curves = [(run, *_curves(d)) for run, d in zip(df["run"], df["_dir"])]
  curves = [c for c in curves if len(c[1]) or len(c[2])]
  if not curves:
    return None
  has_val, legend = any(len(c[2]) for c in curves), len(curves) <= 12
  fig, axes = _pyplot().subplots(1, 1 + has_val, figsize=(13 if has_val else 7, 4.8),
                                 squeeze=False)
  axes = axes[0]
  cmap = _pyplot().get_cmap("tab10" if legend else "viridis")
  for i, (name, train, val) in enumerate(curves):
    color = cmap(i % 10) if legend else cmap(i / max(len(curves) - 1, 1))
    kw = dict(color=color, linewidth=1.2 if legend else 0.7, alpha=0.9 if legend else 0.5)
    axes[0].plot(train["step"], train["loss"], label=name, **kw)
    if has_val and len(val):
      axes[1].plot(val["step"], val["ppl"], marker="o", markersize=3, label=name, **kw)
  axes[0].set(xlabel="optimizer step", title="Training loss",
              ylabel="train loss (mean cross-entropy, nats per token)")
  if has_val:
    log_y = _spread(p for c in curves for p in c[2]["ppl"]) > 10
    axes[1].set(xlabel="optimizer step", ylabel="validation perplexity",
                yscale="log" if log_y else "linear", title="Validation perplexity during training")
  for ax in axes:
    ax.grid(True, alpha=0.3)
  if legend:
    axes[-1].legend(fontsize=7)
  else:
    fig.suptitle(f"{len(curves)} runs (colour = run order, legend omitted)", fontsize=9)
  return _save(fig, path)


def _plots(df: pd.DataFrame, out_dir: str) -> dict[str, str]:
  """Every plot the runs allow; a failing plot is logged and skipped (the tables matter more)."""
  df = df[df["role"] != "base"] if (df["role"] != "base").any() else df  # base: own scale
  plots = {}
  for name, fn in (("ppl_vs_sparsity", plot_ppl_vs_sparsity), ("layer_scan", plot_layer_scan),
                   ("training_curves", plot_training_curves), ("sensitivity", plot_sensitivity),
                   ("heatmaps", plot_heatmaps)):
    try:
      if fn is plot_heatmaps:  # one file per middle ratio
        plots.update(fn(df, out_dir))
      elif path := fn(df, os.path.join(out_dir, name + ".png")):
        plots[name] = path
    except NoSpace:
      raise  # the report cannot be written either: one line, not a traceback per plot
    except Exception:  # pylint: disable=broad-except
      log.exception("report: plot %s failed", name)
  return plots


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


class Report(dict):
  """{name: path} of the files written; `.table` is report.md's Markdown comparison table."""
  table: str = ""


def _paired_or_none(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
  try:
    return paired_comparisons(df)
  except Exception:  # pylint: disable=broad-except
    log.exception("report: paired comparison failed")  # an extra must not lose the tables
    return pd.DataFrame(columns=_PAIRED_COLUMNS), []


_EXTRA_NOTES = {"oneshot_": " One-shot ppl = right after pruning, before fine-tuning.",
                "delta_": " Δ ppl = perplexity minus the dense control's (same seed, else their "
                          "mean)."}


def _intro(df: pd.DataFrame) -> str:
  return (f"{len(df)} runs. Perplexity = exp(mean NLL per scored token); sparsity = measured "
          "fraction of zero weights in the pruned matrices; ratios = the per-block ratios used; "
          "target = overall sparsity asked of a generated allocation."
          + "".join(note for prefix, note in _EXTRA_NOTES.items()
                    if any(c.startswith(prefix) for c in df.columns)))


def write_report(out_dir: str, sources: Sequence[str] | None = None) -> Report:
  """Collects runs under `sources` (default: `out_dir`) and writes the report into `out_dir`.

  Returns {name: path} of the files written: csv, md, seeds_csv (if any seed groups),
  paired_csv (if any paired comparison), ppl_vs_sparsity, heatmap_mid<r>..., layer_scan,
  training_curves, sensitivity (each only when the runs allow that plot); its `.table` attribute holds the
  Markdown table of the runs (the dense control first), for printing.
  """
  sources = list(sources or [out_dir])
  os.makedirs(out_dir, exist_ok=True)
  df = frame(sources)
  written = Report(csv=os.path.join(out_dir, "report.csv"))
  _write_csv(written["csv"], df, _columns(df))
  seeds = _seed_table(df)
  paired, sentences = _paired_or_none(df)
  for name, table in (("seeds", seeds), ("paired", paired)):
    if len(table):
      written[f"{name}_csv"] = os.path.join(out_dir, f"report_{name}.csv")
      _write_csv(written[f"{name}_csv"], table, table.columns)
  plots = _plots(df, out_dir)
  written.update(plots)
  written.table = markdown_table(_control_first(df))
  md = [f"# Report: {', '.join(sources)}", "", _intro(df), "", written.table]
  if len(seeds):
    md += ["", "## Mean ± std over seeds", "",
           "Runs whose resolved configs differ only in `seed`; std is the sample std (n-1).", "",
           _seed_markdown(seeds, _metrics(df))]
  if len(paired):
    md += _paired_markdown(paired, sentences)
  if plots:
    md += ["", "## Plots", ""] + [f"![{n}]({os.path.basename(p)})" for n, p in plots.items()]
  written["md"] = os.path.join(out_dir, "report.md")
  with files.atomic_path(written["md"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(md) + "\n")
  return written


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m blockprune_jax.report",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("dirs", nargs="+", help="directories searched for results.json")
  parser.add_argument("--out", default=None, help="where to write (default: the first dir)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  try:
    written = write_report(args.out or args.dirs[0], args.dirs)
  except UserError as e:  # a full disk (exit 28, as blockprune_jax.main), a bad directory
    print(f"error: {e}", file=sys.stderr)
    return 28 if isinstance(e, NoSpace) else 2
  print(written.table)
  if not find_results(args.dirs):
    print(f"(no results.json under {', '.join(args.dirs)})", file=sys.stderr)
  print("\nwrote: " + ", ".join(sorted(written.values())), file=sys.stderr)
  return 0

