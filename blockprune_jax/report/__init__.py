"""Tables and plots from finished runs: every results.json under the given directories.

    python -m blockprune_jax.report runs/grid [runs/other ...] [--out=DIR]

writes report.csv, report.md, report_seeds.csv, report_paired.csv and the plots the runs allow
into the first directory (or --out); docs/sweeps.md says what they hold and which module does what.
"""
import logging
import sys
from typing import Sequence

from blockprune_jax.errors import NoSpace, UserError
from blockprune_jax.report.dataframe import collect, find_results, frame
from blockprune_jax.report.paired import paired_comparisons
from blockprune_jax.report.tables import markdown_table, seed_groups
from blockprune_jax.report.write import Report, failed_runs, write_report

__all__ = ["Report", "collect", "failed_runs", "find_results", "frame", "main", "markdown_table",
           "paired_comparisons", "seed_groups", "write_report"]


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
