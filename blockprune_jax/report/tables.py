"""The tables of the report: the per-run table, mean ± std over seeds, and how cells print."""
import json
import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from blockprune_jax import config_lib
from blockprune_jax import files
from blockprune_jax.report import stats
from blockprune_jax.report.dataframe import PPL, as_frame


def columns(df: pd.DataFrame) -> list[str]:
  """The per-run table's columns, in order (frame() puts final task scores before one-shot ones)."""
  head = ["run", "role", "method", "allocation", "target", "ratios_per_block"]
  if any(df.get("ratios_per_layer", [])):  # only layer-allocation runs have their own
    head.append("ratios_per_layer")
  head += ["sparsity_overall", "sparsity_per_block"]
  head += [c for p in PPL for c in df.columns if c.startswith(p)]
  head += [c for c in df.columns if "/" in c]  # task scores: '[oneshot/]<task>/<metric>'
  return head + ["seed", "train_steps", "final_train_loss"]


def fmt_ppl(x: float) -> str:
  if not math.isfinite(x) or abs(x) >= 1e6:
    return f"{x:.2e}"  # the 1e70 perplexities of a broken loss stay one short cell
  return f"{x:.2f}"


_FORMATS = {"sparsity_overall": "{:.3f}".format, "final_train_loss": "{:.4f}".format,
            "target": "{:g}".format,
            "sparsity_per_block": lambda v: "/".join(f"{float(x):.3f}" for x in v.split("/"))}


def fmt(col: str, value: Any) -> str:
  """A cell of `col`: perplexities to 2 decimals, sparsities to 3, task scores to 4."""
  if value is None or value == "":
    return ""
  if "/" in col:
    return f"{value:.4f}"
  return (fmt_ppl if col.startswith(PPL) else _FORMATS.get(col, str))(value)


_HEADERS = {"ratios_per_block": "ratios (per block)", "ratios_per_layer": "ratios (per layer)",
            "sparsity_overall": "sparsity", "sparsity_per_block": "sparsity per block",
            "train_steps": "train steps", "final_train_loss": "final train loss",
            "ppl_": "ppl ", "oneshot_": "one-shot ppl ", "delta_": "Δ ppl "}


def header(col: str) -> str:
  prefix = next((p for p in PPL if col.startswith(p)), None)
  return _HEADERS[prefix] + col[len(prefix):] if prefix else _HEADERS.get(col, col)


def markdown(head: Sequence[str], cells: Iterable[Sequence[str]], aligned: bool = False) -> str:
  """A GitHub Markdown table of formatted cells; `aligned` pads the columns (for a console)."""
  return pd.DataFrame(list(cells), columns=range(len(head)), dtype=object).to_markdown(
      index=False, headers=list(head), disable_numparse=True,
      stralign="left" if aligned else None)


def markdown_table(rows) -> str:
  """The per-run table in Markdown."""
  df = as_frame(rows)
  cols = columns(df)
  return markdown([header(c) for c in cols],
                  ([fmt(c, r.get(c)) for c in cols] for r in df.to_dict("records")))


def write_csv(path: str, table: pd.DataFrame, cols: Sequence[str]) -> None:
  """Floats in full (repr), blanks for None, CRLF rows as the csv module writes them."""
  cells = table[list(cols)].apply(lambda column: column.map(
      lambda v: "" if v is None else (repr(v) if isinstance(v, float) else v)))
  with files.atomic_path(path) as tmp:  # a killed report never leaves half a table
    cells.to_csv(tmp, index=False, lineterminator="\r\n")


def keyed(configs: pd.Series, skip: Iterable[str], hide: Iterable[str] = ()) -> pd.DataFrame:
  """Per run: `key`, equal for configs equal but for the dotted keys in `skip`, and `setting`,
  the keys that vary between the runs (minus `hide`) with their values."""
  flats = configs.map(lambda c: {k: json.dumps(v, sort_keys=True)
                                 for k, v in config_lib.flatten(c).items() if k not in skip})
  names = set().union(*flats) if len(flats) else set()
  varying = sorted(k for k in names - set(hide) if len({f.get(k) for f in flats}) > 1)
  return pd.DataFrame({
      "key": flats.map(lambda f: json.dumps(f, sort_keys=True)),
      "setting": flats.map(lambda f: ", ".join(f"{k}={json.loads(f[k])}" for k in varying
                                               if k in f))}, index=configs.index)


def metrics(df: pd.DataFrame) -> list[str]:
  """The columns averaged over seeds."""
  return [c for c in columns(df) if c in ("sparsity_overall", "final_train_loss")
          or c.startswith(PPL) or "/" in c]


def _stat(i: int):
  """Aggregates a column to its mean (i=0) or sample std (i=1) over the finite values."""
  def agg(values: pd.Series) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return stats.mean_std(vals)[i] if len(vals) > i else None
  return agg


SEED_COLUMNS = ["setting", "method", "allocation", "target", "ratios_per_block", "n", "seeds"]


def seed_table(df: pd.DataFrame, min_seeds: int = 2) -> pd.DataFrame:
  """One row per group of runs whose configs differ only in `seed` (`min_seeds` seeds or more),
  with the mean and sample std (n-1) of every metric."""
  runs = df[(df["role"] != "base") & df["_config"].astype(bool)]
  runs = runs.join(keyed(runs["_config"], skip={"seed"}))
  table = runs.groupby("key", sort=False).agg(
      **{c: (c, "first") for c in SEED_COLUMNS[:5]}, n=("run", "size"),
      seeds=("seed", lambda s: "/".join(str(x) for x in sorted(set(s), key=str))),
      n_seeds=("seed", lambda s: len(set(s))),
      **{f"{m}_{stat}": (m, fn) for m in metrics(df)
         for stat, fn in (("mean", _stat(0)), ("std", _stat(1)))})
  table = table[(table.pop("n_seeds") >= min_seeds).astype(bool)]
  return table.reset_index(drop=True).astype(object).replace({np.nan: None})


def seed_groups(rows) -> list[dict]:
  """Runs that differ only in `seed` (two seeds or more), with mean ± std of their numbers."""
  return seed_table(as_frame(rows)).to_dict("records")


def seed_markdown(seeds: pd.DataFrame, cols: Sequence[str], metric_cols: Sequence[str],
                  console: bool = False) -> str:
  """The seed table's `cols` and `metric_cols` (as mean ± std); for a console, aligned."""
  def cell(g: dict, m: str) -> str:
    mean, std = fmt(m, g[f"{m}_mean"]), fmt(m, g[f"{m}_std"])
    return f"{mean} ± {std}" if mean and std else mean
  suffix = "" if console else " (mean ± std)"
  return markdown([header(c) for c in cols] + [header(m) + suffix for m in metric_cols],
                  ([fmt(c, g[c]) for c in cols] + [cell(g, m) for m in metric_cols]
                   for g in seeds.to_dict("records")), aligned=console)
