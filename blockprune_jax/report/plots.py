"""The report's plots, each drawn from the runs' frame (and their metrics.jsonl), or skipped."""
import json
import logging
import os
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from blockprune_jax import files
from blockprune_jax.errors import NoSpace
from blockprune_jax.report.dataframe import GENERATED, num, numeric, val_split
from blockprune_jax.report.tables import fmt_ppl

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only; no display on a TPU VM or cluster node
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _log_scale(values: Iterable[float]) -> bool:
  """Whether the positive values span more than a factor of 10."""
  values = [v for v in values if v and v > 0]
  return bool(values) and max(values) / min(values) > 10


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


def _save(fig, out_dir: str, name: str, ax=None, grid: str = "both", **legend) -> dict[str, str]:
  """{name: path} of the figure written as out_dir/name.png; with `ax`, its grid and legend."""
  if ax is not None:
    ax.legend(fontsize=8, **legend)
    ax.grid(True, axis=grid, alpha=0.3)
  fig.tight_layout()
  path = os.path.join(out_dir, name + ".png")
  with files.atomic_path(path) as tmp:  # the format comes from `path`, not the temporary name
    fig.savefig(tmp, dpi=120, format="png")
  _pyplot().close(fig)
  return {name: path}


def plot_ppl_vs_sparsity(df: pd.DataFrame, out_dir: str) -> dict[str, str]:
  """Validation perplexity vs measured overall sparsity, one series per (method,) allocation."""
  df = _with_val(df)
  pruned = df[(df["method"] != "none") & df["sparsity_overall"].notna()]
  if pruned.empty:
    return {}
  labels = pruned["allocation"].replace("", "?")
  if pruned["method"].nunique() > 1:
    labels = pruned["method"] + " / " + labels
  fig, ax = _pyplot().subplots(figsize=(7.5, 5))
  for i, (label, g) in enumerate(pruned.groupby(labels)):
    g = g.sort_values("sparsity_overall", kind="stable")
    generated = any(a in label for a in GENERATED)  # ordered by target: a line reads well
    ax.plot(g["sparsity_overall"].astype(float), g["val"], marker="osD^v<>PX*h"[i % 11],
            linestyle="-" if generated else "none", alpha=0.85, label=f"{label} ({len(g)} runs)")
  _dense_line(ax, df[df["method"] == "none"], ":")
  log_y, split = _log_scale(df["val"]), val_split(df)
  ax.set(yscale="log" if log_y else "linear",
         title=f"{split.capitalize()} perplexity vs measured sparsity",
         xlabel="measured sparsity of the pruned matrices (fraction of weights = 0)",
         ylabel=f"{split} perplexity (exp of mean NLL per token)"
         + (", log scale" if log_y else ""))
  return _save(fig, out_dir, "ppl_vs_sparsity", ax, title="allocation")


def plot_heatmaps(df: pd.DataFrame, out_dir: str) -> dict[str, str]:
  """For 3-block explicit-ratio grids: validation perplexity over (front, back), per middle ratio
  ("heatmap_mid<r>[_<method>]"), seeds averaged; drawn where there are 2 front and 2 back ratios."""
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  grid = _with_val(df[(df["allocation"] == "explicit")
                      & df["_ratios_block"].map(lambda r: bool(r) and len(r) == 3)])
  grid = grid.join(pd.DataFrame(grid["_ratios_block"].tolist(), index=grid.index,
                                columns=["front", "mid", "back"]).round(6))
  written, methods, split = {}, grid["method"].nunique(), val_split(df)
  for (method, mid), g in grid.groupby(["method", "mid"]):
    z = g.pivot_table(index="front", columns="back", values="val", aggfunc="mean")
    if min(z.shape) < 2:
      continue
    values = z.to_numpy()
    log_scale = _log_scale(values[np.isfinite(values)])
    fig, ax = _pyplot().subplots(figsize=(1.0 * z.shape[1] + 3, 0.8 * z.shape[0] + 2.2))
    cmap = _pyplot().get_cmap("viridis_r").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap=cmap, aspect="auto",
                   norm=colors.LogNorm() if log_scale else None)
    ax.set_xticks(range(z.shape[1]), [f"{b:g}" for b in z.columns])
    ax.set_yticks(range(z.shape[0]), [f"{f:g}" for f in z.index])
    ax.set(xlabel="back block pruning ratio (fraction of weights removed)",
           ylabel="front block pruning ratio")
    ax.set_title(f"{split.capitalize()} perplexity, middle block ratio = {mid:g}\n({method}; "
                 "grey = not run)", fontsize=10)
    if values.size <= 100:
      for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):  # white text on the dark end of the colour scale
          ax.text(j, i, fmt_ppl(float(v)), ha="center", va="center", fontsize=7,
                  color="white" if im.norm(v) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label=f"{split} perplexity" + (" (log scale)" if log_scale else ""))
    written |= _save(fig, out_dir, f"heatmap_mid{mid:g}" + (f"_{method}" if methods > 1 else ""))
  return written


def _single_layer(ratios: Sequence[float] | None) -> int | None:
  nonzero = [i for i, x in enumerate(ratios or ()) if x != 0]
  return nonzero[0] if len(nonzero) == 1 else None


def plot_layer_scan(df: pd.DataFrame, out_dir: str) -> dict[str, str]:
  """Bars of validation perplexity per layer for `layer` runs that prune exactly one layer."""
  scan = _with_val(df[df["allocation"] == "layer"])
  scan = scan.assign(layer=scan["_ratios_layer"].map(_single_layer)).dropna(subset=["layer"])
  if scan.empty:
    return {}
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
      ax.bar_label(drawn, labels=[fmt_ppl(v) if np.isfinite(v) else "" for v in
                                  drawn.datavalues], fontsize=7, padding=1)
  y = _dense_line(ax, same if len(same) else dense, "--")
  ys = np.append(bars.to_numpy().ravel(), np.nan if y is None else y)
  lo, hi = np.nanmin(ys), np.nanmax(ys)
  pad = max((hi - lo) * 0.15, hi * 0.01)
  split = val_split(df)
  ax.set(ylim=(max(0, lo - 3 * pad), hi + 2 * pad),  # zoomed: the differences are small
         xlabel="pruned layer (index, 0 = closest to the embeddings)",
         ylabel=f"{split} perplexity (axis does not start at 0)",
         title=f"{split.capitalize()} perplexity when pruning a single layer")
  return _save(fig, out_dir, "layer_scan", ax, grid="y")


def plot_sensitivity(df: pd.DataFrame, out_dir: str) -> dict[str, str]:
  """The curves `sensitivity` (and `search`) allocations were solved from: calibration-loss
  increase when one block alone is pruned, per block, one faint line per run."""
  found = [c for c in df["_sensitivity"] if c]
  if not found:
    return {}
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for curves in found:
    for b, losses in enumerate(curves["loss_increase"]):
      ax.plot([0.0] + list(curves["grid"]), [0.0] + list(losses), marker=".", alpha=0.6,
              color=colors[b % len(colors)], label=f"block {b}" if curves is found[0] else None)
  ax.set(xlabel="ratio of the block alone", ylabel="calibration loss increase (nats)",
         title=f"Sensitivity curves ({len(found)} run{'s' if len(found) > 1 else ''})")
  return _save(fig, out_dir, "sensitivity", ax)


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
        if isinstance(rec, dict) and num(rec.get("step")) is not None:
          out.append(rec)
  except OSError:
    pass
  return out


def _curves(run_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(train loss, validation perplexity) by step from a run's metrics.jsonl."""
  m = pd.DataFrame(read_metrics(os.path.join(run_dir, METRICS)),
                   columns=["step", "split", "loss", "perplexity"])
  m["step"], m["loss"] = numeric(m["step"]), numeric(m["loss"])
  # perplexity is exp(mean NLL) by definition; exp overflows past a loss of ~700
  m["ppl"] = numeric(m["perplexity"]).fillna(np.exp(m["loss"].where(m["loss"] < 700)))
  train = m[(m["split"] == "train") & m["loss"].notna()].sort_values(["step", "loss"])
  return train, m[(m["split"] == "validation") & m["ppl"].notna()].sort_values(["step", "ppl"])


def plot_training_curves(df: pd.DataFrame, out_dir: str) -> dict[str, str]:
  """Train loss vs step and (where logged) validation perplexity vs step, one line per run."""
  curves = [(run, *_curves(d)) for run, d in zip(df["run"], df["_dir"])]
  curves = [c for c in curves if len(c[1]) or len(c[2])]
  if not curves:
    return {}
  has_val, legend = any(len(c[2]) for c in curves), len(curves) <= 12
  fig, (axes,) = _pyplot().subplots(1, 1 + has_val, figsize=(13 if has_val else 7, 4.8),
                                    squeeze=False)
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
    log_y = _log_scale(p for c in curves for p in c[2]["ppl"])
    axes[1].set(xlabel="optimizer step", ylabel="validation perplexity",
                yscale="log" if log_y else "linear", title="Validation perplexity during training")
  for ax in axes:
    ax.grid(True, alpha=0.3)
  if legend:
    axes[-1].legend(fontsize=7)
  else:
    fig.suptitle(f"{len(curves)} runs (colour = run order, legend omitted)", fontsize=9)
  return _save(fig, out_dir, "training_curves")


def plot_all(df: pd.DataFrame, out_dir: str) -> dict[str, str]:
  """Every plot the runs allow; a failing plot is logged and skipped (the tables matter more)."""
  df = df[df["role"] != "base"] if (df["role"] != "base").any() else df  # base: own scale
  plots = {}
  for plot in (plot_ppl_vs_sparsity, plot_layer_scan, plot_training_curves, plot_sensitivity,
               plot_heatmaps):
    try:
      plots |= plot(df, out_dir)
    except NoSpace:
      raise  # the report cannot be written either: one line, not a traceback per plot
    except Exception:  # pylint: disable=broad-except
      log.exception("report: plot %s failed", plot.__name__.removeprefix("plot_"))
  return plots
