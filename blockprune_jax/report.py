"""Tables and plots from finished runs: every results.json under the given directories.

    python -m blockprune_jax.report runs/grid [runs/other ...] [--out=DIR]

Writes into the first directory (or --out): `report.csv`, `report.md` (with a mean ± std section
for runs that differ only in their seed), `report_seeds.csv` and, where the runs allow them,
`ppl_vs_sparsity.png`, `heatmap_mid<r>.png` (3-block explicit-ratio grids, one per middle ratio),
`layer_scan.png` (one layer pruned at a time) and `training_curves.png`. Prints the Markdown
table. Every number comes from results.json / metrics.jsonl; a missing field is a blank cell.
"""
import csv
import json
import logging
import math
import os
import re
import statistics
import sys
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

RESULTS = "results.json"
METRICS = "metrics.jsonl"
_GENERATED = ("uniform", "linear", "exponential", "owl")  # allocations solved for prune.target
_SKIP_DIRS = {"checkpoints", "checkpoint", "ckpt", "export", "tensorboard", "tb"}

# ----------------------------------------------------------------------------------------------
# Collecting rows
# ----------------------------------------------------------------------------------------------


def _get(d: Any, *path, default=None):
  """d[path[0]][path[1]]...; `default` where anything along the way is missing."""
  for p in path:
    if isinstance(d, dict) and p in d:
      d = d[p]
    elif isinstance(d, (list, tuple)) and isinstance(p, int) and -len(d) <= p < len(d):
      d = d[p]
    else:
      return default
  return d


def _num(x: Any) -> float | None:
  if isinstance(x, bool) or x is None:
    return None
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def _nums(xs: Any) -> list[float] | None:
  if not isinstance(xs, (list, tuple)) or not xs:
    return None
  out = [_num(x) for x in xs]
  return None if any(v is None for v in out) else out


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


def _row(results: dict, run: str, run_dir: str) -> dict:
  """One flat row; keys starting with '_' are for plots and grouping, not for the tables."""
  cfg = results.get("config") if isinstance(results.get("config"), dict) else {}
  pruning = results.get("pruning") if isinstance(results.get("pruning"), dict) else {}
  method = pruning.get("method", _get(cfg, "prune", "method"))
  allocation = pruning.get("allocation", _get(cfg, "prune", "allocation"))
  ratios_block = _nums(pruning.get("ratios_per_block"))
  ratios_layer = _nums(pruning.get("ratios_per_layer"))
  cfg_ratios = _nums(_get(cfg, "prune", "ratios"))
  if ratios_block is None and allocation == "explicit":
    ratios_block = cfg_ratios
  if ratios_layer is None and allocation == "layer":
    ratios_layer = cfg_ratios
  target = _num(_get(cfg, "prune", "target"))
  if method in (None, "none") or allocation not in _GENERATED:
    target = None  # a config default that the run did not use; a blank says so
  per_block = _nums(_get(results, "sparsity", "per_block"))
  ppl = results.get("perplexity") if isinstance(results.get("perplexity"), dict) else {}
  ppl = {str(k): _num(v) for k, v in ppl.items()}
  row = {
      "run": run,
      "role": results.get("role", ""),
      "method": method if method is not None else "",
      "allocation": allocation if allocation is not None else "",
      "target": target,
      "ratios_per_block": _slash(ratios_block),
      "ratios_per_layer": _slash(ratios_layer) if allocation == "layer" else "",
      "sparsity_overall": _num(_get(results, "sparsity", "overall")),
      "sparsity_per_block": _slash(per_block, "{:.6g}"),
      "seed": _get(cfg, "seed", default=results.get("seed")),
      "train_steps": _get(results, "train", "steps"),
      "final_train_loss": _num(_get(results, "train", "final_loss")),
      "_dir": run_dir,
      "_ppl": ppl,
      "_ratios_block": ratios_block,
      "_ratios_layer": ratios_layer,
      "_per_block": per_block,
      "_config": cfg,
  }
  return row


def collect(paths: Sequence[str]) -> list[dict]:
  """Flat rows, one per results.json found (recursively) under `paths`, sorted by run name.

  `run` is the run directory relative to its root (prefixed with the root's name when several
  roots are given). Perplexities are under `ppl_<split>` keys; `role` is results.json's
  `role` ("base" for the shared from-scratch base model, else blank).
  """
  rows = []
  multi = len(paths) > 1
  for root, run_dir in find_results(paths):
    try:
      with open(os.path.join(run_dir, RESULTS)) as f:
        results = json.load(f)
      if not isinstance(results, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
      log.warning("report: skipping %s: %s", os.path.join(run_dir, RESULTS), e)
      continue
    rel = os.path.relpath(run_dir, root)
    base = os.path.basename(os.path.abspath(root))
    run = base if rel == "." else (os.path.join(base, rel) if multi else rel)
    rows.append(_row(results, run, run_dir))
  rows.sort(key=lambda r: _natural_key(r["run"]))
  splits = _splits(rows)
  for r in rows:
    for s in splits:
      r[f"ppl_{s}"] = r["_ppl"].get(s)
  return rows


def _splits(rows: Sequence[dict]) -> list[str]:
  seen = {s for r in rows for s in r["_ppl"]}
  order = [s for s in ("validation", "test") if s in seen]
  return order + sorted(seen - set(order))


def _columns(rows: Sequence[dict]) -> list[str]:
  head = ["run", "role", "method", "allocation", "target", "ratios_per_block"]
  if any(r["ratios_per_layer"] for r in rows):  # only layer-allocation runs have their own
    head.append("ratios_per_layer")
  head += ["sparsity_overall", "sparsity_per_block"]
  return head + [f"ppl_{s}" for s in _splits(rows)] + ["seed", "train_steps", "final_train_loss"]


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _fmt_ppl(x: float | None) -> str:
  if x is None:
    return ""
  if not math.isfinite(x) or abs(x) >= 1e6:
    return f"{x:.2e}"  # the 1e70 perplexities of a broken loss stay one short cell
  return f"{x:.2f}"


def _fmt_md(col: str, value: Any) -> str:
  if value is None or value == "":
    return ""
  if col.startswith("ppl_"):
    return _fmt_ppl(value)
  if col == "sparsity_overall":
    return f"{value:.3f}"
  if col == "sparsity_per_block":
    return "/".join(f"{float(v):.3f}" for v in value.split("/"))
  if col == "final_train_loss":
    return f"{value:.4f}"
  if col == "target":
    return f"{value:g}"
  return str(value)


_HEADERS = {"ratios_per_block": "ratios (per block)", "ratios_per_layer": "ratios (per layer)", "sparsity_overall": "sparsity",
            "sparsity_per_block": "sparsity per block", "train_steps": "train steps",
            "final_train_loss": "final train loss"}


def _header(col: str) -> str:
  if col.startswith("ppl_"):
    return f"ppl {col[4:]}"
  return _HEADERS.get(col, col)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  """A GitHub Markdown table: perplexities to 2 decimals, sparsities to 3."""
  columns = list(columns or _columns(rows))
  lines = ["| " + " | ".join(_header(c) for c in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt_md(c, r.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def _write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
      w.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c])
                  for c in columns])


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = json.dumps(v, sort_keys=True)
  return out


def seed_groups(rows: Sequence[dict]) -> list[dict]:
  """Runs that differ only in `seed`, with mean ± std (sample std, n-1) of their numbers.

  Runs are grouped by their whole resolved config minus `seed` (minus paths that name the run);
  only groups with two or more distinct seeds are returned.
  """
  ignore = {"seed"}
  keyed = {}
  for r in rows:
    if r["role"] == "base" or not r["_config"]:
      continue
    flat = {k: v for k, v in _flatten(r["_config"]).items() if k not in ignore}
    keyed.setdefault(json.dumps(flat, sort_keys=True), []).append((r, flat))
  all_flats = [f for group in keyed.values() for _, f in group]
  varying = sorted(k for k in set().union(*all_flats) if len({f.get(k) for f in all_flats}) > 1) \
      if all_flats else []
  groups = []
  for members in keyed.values():
    seeds = {r["seed"] for r, _ in members}
    if len(seeds) < 2:
      continue
    runs = [r for r, _ in members]
    flat = members[0][1]
    g = {"setting": ", ".join(f"{k}={json.loads(flat[k])}" for k in varying if k in flat),
         "method": runs[0]["method"], "allocation": runs[0]["allocation"],
         "target": runs[0]["target"], "ratios_per_block": runs[0]["ratios_per_block"],
         "n": len(runs), "seeds": "/".join(str(s) for s in sorted(seeds, key=str))}
    for col in ["sparsity_overall"] + [c for c in _columns(rows) if c.startswith("ppl_")] + \
        ["final_train_loss"]:
      vals = [r.get(col) for r in runs if r.get(col) is not None and math.isfinite(r.get(col))]
      g[f"{col}_mean"] = statistics.fmean(vals) if vals else None
      g[f"{col}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
    groups.append(g)
  return groups


def _seed_markdown(groups: Sequence[dict], rows: Sequence[dict]) -> str:
  metrics = ["sparsity_overall"] + [c for c in _columns(rows) if c.startswith("ppl_")] + \
      ["final_train_loss"]
  cols = ["setting", "method", "allocation", "target", "ratios_per_block", "n", "seeds"]
  head = [_header(c) for c in cols] + [_header(m) + " (mean ± std)" for m in metrics]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for g in groups:
    cells = [_fmt_md(c, g.get(c)) for c in cols]
    for m in metrics:
      mean, std = g.get(f"{m}_mean"), g.get(f"{m}_std")
      if mean is None:
        cells.append("")
        continue
      fmt = _fmt_ppl if m.startswith("ppl_") else (
          (lambda x: f"{x:.3f}") if m == "sparsity_overall" else (lambda x: f"{x:.4f}"))
      cells.append(fmt(mean) + ("" if std is None else f" ± {fmt(std)}"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # files only; no display on a TPU VM or cluster node
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _val_ppl(row: dict) -> float | None:
  ppl = row["_ppl"]
  x = ppl.get("validation", next(iter(ppl.values()), None) if ppl else None)
  return x if x is not None and math.isfinite(x) and x > 0 else None


def _val_split(rows: Sequence[dict]) -> str:
  splits = _splits(rows)
  return "validation" if "validation" in splits or not splits else splits[0]


def _spread(values: Sequence[float]) -> float:
  values = [v for v in values if v and v > 0]
  return max(values) / min(values) if values else 1.0


def _is_dense(row: dict) -> bool:
  return row["method"] == "none"


def plot_ppl_vs_sparsity(rows: Sequence[dict], path: str) -> str | None:
  """Validation perplexity vs measured overall sparsity, one series per (method,) allocation."""
  pts = [r for r in rows if _val_ppl(r) is not None]
  pruned = [r for r in pts if not _is_dense(r) and r["sparsity_overall"] is not None]
  dense = [r for r in pts if _is_dense(r)]
  if not pruned:
    return None
  plt = _pyplot()
  methods = {r["method"] for r in pruned}
  series = {}
  for r in pruned:
    label = r["allocation"] or "?"
    if len(methods) > 1:
      label = f"{r['method']} / {label}"
    series.setdefault(label, []).append(r)
  fig, ax = plt.subplots(figsize=(7.5, 5))
  markers = "osD^v<>PX*h"
  for i, (label, members) in enumerate(sorted(series.items())):
    members.sort(key=lambda r: r["sparsity_overall"])
    xs = [r["sparsity_overall"] for r in members]
    ys = [_val_ppl(r) for r in members]
    generated = any(a in label for a in _GENERATED)  # ordered by target: a line reads well
    ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if generated else "none",
            alpha=0.85, label=f"{label} ({len(members)} runs)")
  if dense:
    y = statistics.fmean(_val_ppl(r) for r in dense)
    ax.axhline(y, color="k", linestyle=":", label=f"unpruned ({y:.2f})")
  all_y = [_val_ppl(r) for r in pts]
  if _spread(all_y) > 10:
    ax.set_yscale("log")
  split = _val_split(rows)
  ax.set_xlabel("measured sparsity of the pruned matrices (fraction of weights = 0)")
  ax.set_ylabel(f"{split} perplexity (exp of mean NLL per token)"
                + (", log scale" if ax.get_yscale() == "log" else ""))
  ax.set_title(f"{split.capitalize()} perplexity vs measured sparsity")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, title="allocation")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _r6(x: float) -> float:
  return round(x, 6)


def plot_heatmaps(rows: Sequence[dict], out_dir: str) -> dict[str, str]:
  """For 3-block explicit-ratio grids: validation perplexity over (front, back), per middle ratio.

  Runs with the same ratios (seeds) are averaged. A middle ratio needs at least 2 front and 2 back
  ratios to be drawn. Returns {"heatmap_mid<r>[_<method>]": path}.
  """
  grid = [r for r in rows if r["allocation"] == "explicit" and r["_ratios_block"]
          and len(r["_ratios_block"]) == 3 and _val_ppl(r) is not None]
  methods = sorted({r["method"] for r in grid})
  written = {}
  for method in methods:
    by_mid = {}
    for r in grid:
      if r["method"] == method:
        by_mid.setdefault(_r6(r["_ratios_block"][1]), []).append(r)
    for mid, members in sorted(by_mid.items()):
      fronts = sorted({_r6(r["_ratios_block"][0]) for r in members})
      backs = sorted({_r6(r["_ratios_block"][2]) for r in members})
      if len(fronts) < 2 or len(backs) < 2:
        continue
      name = f"heatmap_mid{mid:g}" + (f"_{method}" if len(methods) > 1 else "")
      written[name] = _heatmap(members, fronts, backs, mid, method, _val_split(rows),
                               os.path.join(out_dir, name + ".png"))
  return written


def _heatmap(members, fronts, backs, mid, method, split, path) -> str:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  cells = {}
  for r in members:
    cells.setdefault((_r6(r["_ratios_block"][0]), _r6(r["_ratios_block"][2])), []).append(
        _val_ppl(r))
  z = np.full((len(fronts), len(backs)), np.nan)
  for (f, b), vals in cells.items():
    z[fronts.index(f), backs.index(b)] = statistics.fmean(vals)
  finite = z[np.isfinite(z)]
  log_scale = _spread(list(finite)) > 10
  norm = colors.LogNorm(finite.min(), finite.max()) if log_scale else None
  fig, ax = plt.subplots(figsize=(1.0 * len(backs) + 3, 0.8 * len(fronts) + 2.2))
  cmap = plt.get_cmap("viridis_r").with_extremes(bad="lightgrey")
  im = ax.imshow(np.ma.masked_invalid(z), origin="lower", cmap=cmap, norm=norm, aspect="auto")
  ax.set_xticks(range(len(backs)), [f"{b:g}" for b in backs])
  ax.set_yticks(range(len(fronts)), [f"{f:g}" for f in fronts])
  ax.set_xlabel("back block pruning ratio (fraction of weights removed)")
  ax.set_ylabel("front block pruning ratio")
  ax.set_title(f"{split.capitalize()} perplexity, middle block ratio = {mid:g}\n"
               f"({method}; grey = not run)", fontsize=10)
  if len(fronts) * len(backs) <= 100:
    lo, hi = (finite.min(), finite.max()) if finite.size else (0, 1)
    for i in range(len(fronts)):
      for j in range(len(backs)):
        if np.isfinite(z[i, j]):
          t = (np.log(z[i, j]) - np.log(lo)) / max(np.log(hi) - np.log(lo), 1e-12) \
              if log_scale else (z[i, j] - lo) / max(hi - lo, 1e-12)
          ax.text(j, i, _fmt_ppl(float(z[i, j])), ha="center", va="center", fontsize=7,
                  color="white" if t > 0.6 else "black")
  fig.colorbar(im, ax=ax, label=f"{split} perplexity" + (" (log scale)" if log_scale else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_layer_scan(rows: Sequence[dict], path: str) -> str | None:
  """Bars of validation perplexity per layer for `layer` runs that prune exactly one layer."""
  scan = {}
  for r in rows:
    ratios = r["_ratios_layer"]
    if r["allocation"] != "layer" or not ratios or _val_ppl(r) is None:
      continue
    nonzero = [i for i, x in enumerate(ratios) if x != 0]
    if len(nonzero) == 1:
      layer = nonzero[0]
      scan.setdefault(_r6(ratios[layer]), {}).setdefault(layer, []).append(_val_ppl(r))
  if not scan:
    return None
  steps = {r["train_steps"] for r in rows if r["allocation"] == "layer"}
  dense = [r for r in rows if r["role"] != "base" and _val_ppl(r) is not None and (
      _is_dense(r) or (r["_ratios_layer"] and not any(r["_ratios_layer"])))]
  same = [r for r in dense if r["train_steps"] in steps]  # compare like with like (fine-tuned)
  dense = same or dense
  plt = _pyplot()
  layers = sorted({l for per in scan.values() for l in per})
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 3), 4.5))
  width = 0.8 / len(scan)
  ys_all = []
  for k, (ratio, per) in enumerate(sorted(scan.items())):
    xs = [l - 0.4 + width * (k + 0.5) for l in layers if l in per]
    ys = [statistics.fmean(per[l]) for l in layers if l in per]
    ys_all += ys
    bars = ax.bar(xs, ys, width=width * 0.95, label=f"one layer pruned to {ratio:g}")
    if len(layers) * len(scan) <= 40:
      ax.bar_label(bars, labels=[_fmt_ppl(y) for y in ys], fontsize=7, padding=1)
  if dense:
    y = statistics.fmean(_val_ppl(r) for r in dense)
    ys_all.append(y)
    ax.axhline(y, color="k", linestyle="--", label=f"unpruned ({y:.2f})")
  lo, hi = min(ys_all), max(ys_all)
  pad = max((hi - lo) * 0.15, hi * 0.01)
  ax.set_ylim(max(0, lo - 3 * pad), hi + 2 * pad)  # zoomed: the differences are small
  ax.set_xticks(layers, [str(l) for l in layers])
  split = _val_split(rows)
  ax.set_xlabel("pruned layer (index, 0 = closest to the embeddings)")
  ax.set_ylabel(f"{split} perplexity (axis does not start at 0)")
  ax.set_title(f"{split.capitalize()} perplexity when pruning a single layer")
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


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


def plot_training_curves(rows: Sequence[dict], path: str) -> str | None:
  """Train loss vs step and (where logged) validation perplexity vs step, one line per run."""
  curves = []
  for r in rows:
    recs = read_metrics(os.path.join(r["_dir"], METRICS))
    train = sorted((float(m["step"]), float(m["loss"])) for m in recs
                   if m.get("split") == "train" and _num(m.get("loss")) is not None)
    val = []
    for m in recs:
      if m.get("split") != "validation":
        continue
      p = _num(m.get("perplexity"))
      if p is None and _num(m.get("loss")) is not None and m["loss"] < 700:
        p = math.exp(m["loss"])  # perplexity is exp(mean NLL) by definition
      if p is not None and math.isfinite(p):
        val.append((float(m["step"]), p))
    if train or val:
      curves.append((r["run"], train, sorted(val)))
  if not curves:
    return None
  plt = _pyplot()
  has_val = any(v for _, _, v in curves)
  fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(13 if has_val else 7, 4.8),
                           squeeze=False)
  axes = axes[0]
  legend = len(curves) <= 12
  cmap = plt.get_cmap("tab10" if legend else "viridis")
  for i, (name, train, val) in enumerate(curves):
    color = cmap(i % 10) if legend else cmap(i / max(len(curves) - 1, 1))
    kw = dict(color=color, linewidth=1.2 if legend else 0.7, alpha=0.9 if legend else 0.5)
    if train:
      axes[0].plot(*zip(*train), label=name, **kw)
    if has_val and val:
      axes[1].plot(*zip(*val), marker="o", markersize=3, label=name, **kw)
  axes[0].set_xlabel("optimizer step")
  axes[0].set_ylabel("train loss (mean cross-entropy, nats per token)")
  axes[0].set_title("Training loss")
  if has_val:
    axes[1].set_xlabel("optimizer step")
    ys = [p for _, _, v in curves for _, p in v]
    if _spread(ys) > 10:
      axes[1].set_yscale("log")
    axes[1].set_ylabel("validation perplexity")
    axes[1].set_title("Validation perplexity during training")
  for ax in axes:
    ax.grid(True, alpha=0.3)
  if legend:
    axes[-1].legend(fontsize=7)
  else:
    fig.suptitle(f"{len(curves)} runs (colour = run order, legend omitted)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def write_report(out_dir: str, sources: Sequence[str] | None = None) -> dict[str, str]:
  """Collects runs under `sources` (default: `out_dir`) and writes the report into `out_dir`.

  Returns {name: path} of the files written: csv, md, seeds_csv (if any seed groups),
  ppl_vs_sparsity, heatmap_mid<r>..., layer_scan, training_curves (each only when the runs
  allow that plot).
  """
  sources = list(sources or [out_dir])
  os.makedirs(out_dir, exist_ok=True)
  rows = collect(sources)
  columns = _columns(rows)
  written = {}
  written["csv"] = os.path.join(out_dir, "report.csv")
  _write_csv(written["csv"], rows, columns)

  groups = seed_groups(rows)
  if groups:
    seed_cols = list(groups[0].keys())
    written["seeds_csv"] = os.path.join(out_dir, "report_seeds.csv")
    _write_csv(written["seeds_csv"], groups, seed_cols)

  plot_rows = [r for r in rows if r["role"] != "base"] or rows  # base: scratch model, own scale
  plots = {}
  for name, fn in (("ppl_vs_sparsity", plot_ppl_vs_sparsity), ("layer_scan", plot_layer_scan),
                   ("training_curves", plot_training_curves)):
    try:
      p = fn(plot_rows, os.path.join(out_dir, name + ".png"))
      if p:
        plots[name] = p
    except Exception:  # pylint: disable=broad-except
      log.exception("report: plot %s failed", name)  # one bad plot must not lose the tables
  try:
    plots.update(plot_heatmaps(plot_rows, out_dir))
  except Exception:  # pylint: disable=broad-except
    log.exception("report: heatmaps failed")
  written.update(plots)

  md = [f"# Report: {', '.join(sources)}", "",
        f"{len(rows)} runs. Perplexity = exp(mean NLL per scored token); sparsity = measured "
        "fraction of zero weights in the pruned matrices; ratios = the per-block ratios used; "
        "target = overall sparsity asked of a generated allocation.", "",
        markdown_table(rows, columns)]
  if groups:
    md += ["", "## Mean ± std over seeds", "",
           "Runs whose resolved configs differ only in `seed`; std is the sample std (n-1).", "",
           _seed_markdown(groups, rows)]
  if plots:
    md += ["", "## Plots", ""] + [f"![{n}]({os.path.basename(p)})" for n, p in plots.items()]
  written["md"] = os.path.join(out_dir, "report.md")
  with open(written["md"], "w") as f:
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
  out = args.out or args.dirs[0]
  written = write_report(out, args.dirs)
  rows = collect(args.dirs)
  print(markdown_table(rows))
  if not rows:
    print(f"(no results.json under {', '.join(args.dirs)})", file=sys.stderr)
  print("\nwrote: " + ", ".join(sorted(written.values())), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
