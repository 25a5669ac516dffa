"""One DataFrame, a row per results.json, that every table and plot reads: cells are Python
objects with None for a blank (a NaN perplexity, a diverged run, is no blank); an odd field is a
blank, never an error."""
import json
import logging
import math
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from blockprune_jax import files
from blockprune_jax import trees

log = logging.getLogger(__name__)

# Allocations solved for prune.target (generated or measured on the model).
GENERATED = ("uniform", "linear", "exponential", "owl", "sensitivity", "search")
PPL = ("ppl_", "oneshot_", "delta_")  # prefixes of the perplexity columns, in table order
ONESHOT_TASKS = "oneshot/"  # prefix of the one-shot task columns; every task column has a '/'
_SKIP_DIRS = {"checkpoints", "checkpoint", "ckpt", "export", "tensorboard", "tb"}


def num(x: Any) -> float | None:
  if isinstance(x, bool) or x is None:
    return None
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def _nums(xs: Any) -> list[float] | None:
  out = [num(x) for x in xs] if isinstance(xs, (list, tuple)) else []
  return None if not out or None in out else out


def _slash(xs: Sequence[float] | None, fmt: str = "{:g}") -> str:
  return "/".join(fmt.format(x) for x in xs) if xs else ""


def _natural_key(text: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_results(paths: Iterable[str]) -> list[tuple[str, str]]:
  """(root, run_dir) for every results.json under each path (a path may be a run dir itself)."""
  found = []
  for root in paths:
    if os.path.isfile(root) and os.path.basename(root) == files.RESULTS:
      found.append((os.path.dirname(root) or ".", os.path.dirname(root) or "."))
      continue
    if not os.path.isdir(root):
      log.warning("report: %s is not a directory, skipped", root)
      continue
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS)
      if files.RESULTS in filenames:
        found.append((root, dirpath))
  return found


def load(path: str) -> dict | None:
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
  return {str(k): num(v) for k, v in d.items()} if isinstance(d, dict) else {}


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
  target = num(trees.get_path(cfg, ("prune", "target")))
  if method in (None, "none") or allocation not in GENERATED:
    target = None  # a config default that the run did not use; a blank says so
  ppl = _ppls(results.get("perplexity"))
  val = ppl.get("validation", next(iter(ppl.values()), None))  # else the first split's
  sens = pruning.get("sensitivity")  # the curves a sensitivity / search allocation was solved from
  return {
      "run": run,
      "role": "control" if "control" in (results.get("role"), cfg.get("role"))
              else results.get("role", ""),
      "method": method if method is not None else "",
      "allocation": allocation if allocation is not None else "",
      "target": target,
      "ratios_per_block": _slash(ratios_block),
      "ratios_per_layer": _slash(ratios_layer) if allocation == "layer" else "",
      "sparsity_overall": num(trees.get_path(results, ("sparsity", "overall"))),
      "sparsity_per_block": _slash(_nums(trees.get_path(results, ("sparsity", "per_block"))),
                                   "{:.6g}"),
      "seed": trees.get_path(cfg, ("seed",), results.get("seed")),
      "train_steps": trees.get_path(results, ("train", "steps")),
      "final_train_loss": num(trees.get_path(results, ("train", "final_loss"))),
      "_dir": run_dir,
      "_ppl": ppl,
      "_oneshot": _ppls(trees.get_path(results, ("oneshot", "perplexity"))),
      "_tasks": _task_scores(results.get("tasks")),
      "_oneshot_tasks": _task_scores(results.get("oneshot_tasks"), ONESHOT_TASKS),
      "_val": val if val is not None and math.isfinite(val) and val > 0 else None,  # plottable
      "_ratios_block": ratios_block,
      "_ratios_layer": ratios_layer,
      "_config": cfg,
      "_sensitivity": sens if isinstance(sens, dict) and sens.get("grid")
                      and sens.get("loss_increase") else None,
  }


def _task_scores(tasks: Any, prefix: str = "") -> dict:
  """{'<prefix><task>/<metric>': value} of results.json's task scores, stderrs left out."""
  if not isinstance(tasks, dict):
    return {}
  return {f"{prefix}{task}/{metric}": num(value)
          for task, metrics in tasks.items() if isinstance(metrics, dict)
          for metric, value in metrics.items() if not metric.endswith("_stderr")}


def _splits(names: Iterable[str]) -> list[str]:
  """validation, test, then the others by name."""
  return sorted(set(names), key=lambda s: (s != "validation", s != "test", s))


def objects(values: Iterable[Any], index) -> pd.Series:
  """A column of Python objects: None stays None (not NaN) and ints stay ints."""
  return pd.Series(list(values), index=index, dtype=object)


def frame(paths: Sequence[str]) -> pd.DataFrame:
  """The runs under `paths`, sorted by `run`, their directory relative to its root (with the
  root's name when several are given). Columns ppl_<split>, oneshot_<split> (right after pruning),
  delta_<split> (minus the dense control's), `role` ("base", "control" or results.json's)."""
  records = []
  for root, run_dir in find_results(paths):
    results = load(os.path.join(run_dir, files.RESULTS))
    if results is not None:
      rel = os.path.relpath(run_dir, root)
      base = os.path.basename(os.path.abspath(root))
      run = base if rel == "." else (os.path.join(base, rel) if len(paths) > 1 else rel)
      records.append(_record(results, run, run_dir))
  records.sort(key=lambda r: _natural_key(r["run"]))
  df = pd.DataFrame(records, columns=list(_record({}, "", "")), dtype=object)
  for source, prefix in (("_ppl", "ppl_"), ("_oneshot", "oneshot_"), ("_tasks", ""),
                         ("_oneshot_tasks", "")):
    for name in _splits(name for d in df[source] for name in d):  # tasks: sorted
      df[prefix + name] = objects((d.get(name) for d in df[source]), df.index)
  return _add_deltas(df)


def _delta(run: pd.Series, controls: pd.DataFrame, col: str) -> float | None:
  if run["role"] == "base" or run[col] is None:
    return None  # the base is another model (trained from scratch): no comparison
  if run["role"] == "control":
    return 0.0
  # A control is the dense model trained like the pruned runs: the controls fine-tuned for the
  # run's number of steps, and of its seed, where there are such; else all of them (their mean).
  for key in ("train_steps", "seed"):
    same = controls[controls[key] == run[key]]
    controls = same if len(same) else controls
  return None if controls.empty else run[col] - float(numeric(controls[col]).mean())


def _add_deltas(df: pd.DataFrame) -> pd.DataFrame:
  """delta_<split> = perplexity minus the dense control's, when there is a control run."""
  if not (df["role"] == "control").any():
    return df
  for col in [c for c in df.columns if c.startswith("ppl_")]:
    controls = df[(df["role"] == "control") & numeric(df[col]).notna()]
    df["delta_" + col[4:]] = objects((_delta(r, controls, col) for _, r in df.iterrows()),
                                     df.index)
  return df


def as_frame(rows) -> pd.DataFrame:
  """`rows` as a frame: callers may still pass collect()'s list of dicts."""
  return rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), dtype=object)


def collect(paths: Sequence[str]) -> list[dict]:
  """`frame(paths)` as a list of dicts, one per run (None for a blank)."""
  return frame(paths).to_dict("records")


def column(df: pd.DataFrame, name: str) -> pd.Series:
  """df[name], or blanks where no run has that column."""
  return df[name] if name in df.columns else objects([None] * len(df), df.index)


def numeric(values) -> pd.Series:
  """Floats to compute with: blanks and ±inf become NaN (no mean or difference has them)."""
  x = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype(float)
  return x.where(np.isfinite(x))


def val_split(df: pd.DataFrame) -> str:
  """The split the paired comparison and plots use: validation, else the first one."""
  splits = [c[4:] for c in df.columns if c.startswith("ppl_")]
  return "validation" if "validation" in splits or not splits else splits[0]
