"""report.md, report.csv and the rest from the runs' frame, and the answer a sweep's console ends
with: mean ± std per setting over seeds and the paired comparison's sentences."""
import logging
import os
from typing import Sequence

import pandas as pd

from blockprune_jax import files
from blockprune_jax.report import dataframe
from blockprune_jax.report import paired as paired_lib
from blockprune_jax.report import plots
from blockprune_jax.report import tables

log = logging.getLogger(__name__)



class Report(dict):
  """{name: path} of the files written; `.table` is report.md's table of every run, `.answer`
  the means over seeds and the paired sentences (what a sweep's console ends with)."""
  table: str = ""
  answer: str = ""


def failed_runs(sources: Sequence[str]) -> list[tuple[str, str]]:
  """(run, first line of its error) for every run that sweep.json under `sources` says failed."""
  out = []
  for root in sources:
    path = os.path.join(root, files.SWEEP_JSON)
    runs = (dataframe.load(path) or {}).get("runs") if os.path.isfile(path) else None
    prefix = os.path.basename(os.path.abspath(root)) if len(sources) > 1 else ""
    out += [(os.path.join(prefix, str(row.get("name", "?"))),
             str(row.get("error") or "no reason recorded").splitlines()[0])
            for row in (runs if isinstance(runs, list) else [])
            if isinstance(row, dict) and row.get("status") == "failed"]
  return out


_EXTRA_NOTES = {"oneshot_": " One-shot ppl = right after pruning, before fine-tuning.",
                "delta_": " Δ ppl = perplexity minus the dense control's (same seed, else their "
                          "mean)."}


def _intro(df: pd.DataFrame, failed: Sequence) -> str:
  runs = f"{len(df)} runs" + (f" ({len(failed)} more failed: see Failed runs)" if failed else "")
  return (f"{runs}. Perplexity = exp(mean NLL per scored token); sparsity = measured "
          "fraction of zero weights in the pruned matrices; ratios = the per-block ratios used; "
          "target = overall sparsity asked of a generated allocation."
          + "".join(note for prefix, note in _EXTRA_NOTES.items()
                    if any(c.startswith(prefix) for c in df.columns)))


def _answer(df: pd.DataFrame, sentences: Sequence[str]) -> str:
  """Mean ± std per setting (one seed or more) and the paired sentences, for the console."""
  lines = [f"- {s}" for s in sentences]
  groups = tables.seed_table(df, min_seeds=1)
  if len(groups):
    groups["setting"] = groups["setting"].replace("", "(every run)")  # nothing varies
    metrics = [m for m in tables.metrics(df) if m != "final_train_loss"]
    table = tables.seed_markdown(groups, ["setting", "n"], metrics, console=True)
    lines = ["Mean ± std over seeds, per setting:", "", table] + ([""] if lines else []) + lines
  return "\n".join(lines)


def write_report(out_dir: str, sources: Sequence[str] | None = None) -> Report:
  """The report of the runs under `sources` (default: `out_dir`), written into `out_dir`: {name:
  path} of csv, md, seeds_csv and paired_csv (where there are such tables) and each plot drawn."""
  sources = list(sources or [out_dir])
  os.makedirs(out_dir, exist_ok=True)
  df = dataframe.frame(sources)
  failed = failed_runs(sources)
  written = Report(csv=os.path.join(out_dir, "report.csv"))
  tables.write_csv(written["csv"], df, tables.columns(df))
  seeds = tables.seed_table(df)
  try:
    paired, sentences = paired_lib.paired_comparisons(df)
  except Exception:  # pylint: disable=broad-except
    log.exception("report: paired comparison failed")  # an extra must not lose the tables
    paired, sentences = pd.DataFrame(columns=paired_lib.COLUMNS), []
  for name, table in (("seeds", seeds), ("paired", paired)):
    if len(table):
      written[f"{name}_csv"] = os.path.join(out_dir, f"report_{name}.csv")
      tables.write_csv(written[f"{name}_csv"], table, table.columns)
  drawn = plots.plot_all(df, out_dir)
  written.update(drawn)
  written.table = tables.markdown_table(
      df.sort_values("role", key=lambda role: role != "control", kind="stable"))  # control first
  written.answer = _answer(df, sentences)
  md = [f"# Report: {', '.join(sources)}", "", _intro(df, failed), "", written.table]
  if failed:
    md += ["", "## Failed runs", "", "These runs have no results.json; sweep.json says why:", ""]
    md += [f"- {name}: {reason}" for name, reason in failed]
  if len(seeds):
    md += ["", "## Mean ± std over seeds", "",
           "Runs whose resolved configs differ only in `seed`; std is the sample std (n-1).", "",
           tables.seed_markdown(seeds, tables.SEED_COLUMNS, tables.metrics(df))]
  if len(paired):
    md += paired_lib.paired_markdown(paired, sentences)
  if drawn:
    md += ["", "## Plots", ""] + [f"![{n}]({os.path.basename(p)})" for n, p in drawn.items()]
  written["md"] = os.path.join(out_dir, "report.md")
  with files.atomic_path(written["md"]) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(md) + "\n")
  return written
