r"""Run a grid of experiments, one workdir each, then write the report (docs/sweeps.md says how).

    python -m blockprune_jax.sweep --config=configs/blocks.py --workdir=runs/grid \
        --sweep=prune.ratios=0,0.3,0.6:0,0.3,0.6:0,0.3,0.6 --sweep=seed=0,1
"""
import functools
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import ml_collections

from blockprune_jax import config_lib
from blockprune_jax import files
from blockprune_jax import keys
from blockprune_jax import parallel
from blockprune_jax import trees
from blockprune_jax.errors import NoSpace, Preempted, UserError

log = logging.getLogger(__name__)

OVERRIDES_JSON = "overrides.json"
MAX_NAME_LEN = 120  # keeps paths well below filesystem limits (255 per component)


def parse_spec(config: ml_collections.ConfigDict, spec: str) -> tuple[str, list[Any]]:
  """`KEY=SPEC` -> (key, values typed like the key's value in `config`)."""
  if "=" not in spec:
    raise UserError(f"sweep: '--sweep={spec}' needs the form KEY=VALUES, "
                    "e.g. --sweep=prune.target=0.3,0.5")
  key, text = spec.split("=", 1)
  key = config_lib.strip_prefix(key.strip())  # also the spelling of --config.a.b overrides
  current = config_lib.lookup(config, key)
  if not isinstance(current, (tuple, list)):
    return key, [config_lib.parse_text(key, v, current) for v in text.split(",")]
  values = []
  for alternative in text.split("|"):  # a|b: alternatives; a:b: positions; a,b: choices
    positions = [[c for c in pos.split(",") if c.strip()] for pos in alternative.split(":")]
    empty = [i for i, choices in enumerate(positions) if not choices]
    if not alternative.strip():
      values.append(())
    elif empty:
      raise UserError(f"sweep: '--sweep={spec}': position {empty[0]} of '{alternative}' is empty")
    else:
      values += [config_lib.parse_text(key, ",".join(combo), current)
                 for combo in itertools.product(*positions)]
  return key, values


def load_get_sweep(config_path: str) -> list[dict] | None:
  """Calls `get_sweep(arg)` of the config file `path.py[:arg]`; None if the file has none."""
  path, _, arg = config_path.partition(":")
  if not os.path.exists(path):
    raise UserError(f"sweep: config file '{path}' not found")
  get_sweep = getattr(config_lib.load_file(path, "_blockprune_sweep_config"), "get_sweep", None)
  if get_sweep is None:
    return None
  runs = get_sweep(arg) if arg else get_sweep()
  if not isinstance(runs, (list, tuple)) or not all(isinstance(r, dict) for r in runs):
    raise UserError(f"sweep: get_sweep() in '{path}' must return a list of dicts "
                    "(dotted config key -> value)")
  return list(runs)


def _signature(run: dict) -> str:
  return json.dumps(files.plain(run), sort_keys=True)


def expand_sweep(config: ml_collections.ConfigDict, specs: Sequence[str] | None,
                 sweep_fn_list: Sequence[dict] | None) -> list[dict]:
  """The runs, each {dotted key: typed value}, duplicates dropped: the product of the `--sweep`
  `specs` if any (get_sweep's `sweep_fn_list` is then ignored), else `sweep_fn_list`, else [{}]."""
  runs = [{}]
  if specs:
    if sweep_fn_list:
      log.info("sweep: --sweep flags given; the config file's get_sweep() is not used")
    parsed = [parse_spec(config, s) for s in specs]
    names = [k for k, _ in parsed]
    dup = {k for k in names if names.count(k) > 1}
    if dup:
      raise UserError(f"sweep: key(s) {', '.join(sorted(dup))} given in more than one --sweep; "
                      "list all values in one flag")
    runs = [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in parsed))]
  elif sweep_fn_list:
    listed = [{config_lib.strip_prefix(k): v for k, v in o.items()} for o in sweep_fn_list]
    runs = [{k: config_lib.coerce(k, v, config_lib.lookup(config, k)) for k, v in o.items()}
            for o in listed]
  unique = {}
  for run in runs:
    if unique.setdefault(_signature(run), run) is not run:
      log.warning("sweep: dropping a duplicate run %s", run)
  return list(unique.values())


def with_controls(config: ml_collections.ConfigDict, runs: Sequence[dict]) -> list[dict]:
  """`runs` preceded by the dense controls a fair pruning study needs (`sweep.controls`): a
  pruned run that fine-tunes is compared with the dense model fine-tuned alike (its overrides less
  `prune.*`, prune.method=none, role=control), one per such setting not in the sweep already."""
  if "sweep" in config and not config.sweep.controls:
    return list(runs)
  controls, have = [], {_signature(r) for r in runs}
  dense_drops = keys.where(needs="pruning") | {"role"}
  for run in runs:
    cfg = config_lib.apply_overrides(config, run)
    if cfg.prune.method == "none" or (cfg.train.steps <= 0 and cfg.train.epochs <= 0):
      continue
    control = {k: v for k, v in run.items() if k not in dense_drops}
    control.update({"prune.method": "none", "role": "control"})
    sigs = {_signature(control), _signature({k: v for k, v in control.items() if k != "role"})}
    if not sigs & have:
      controls.append(control)
      have |= sigs
  if controls:
    _say(f"sweep: {len(controls)} dense control run(s) added, fine-tuned like the pruned runs "
         "(sweep.controls=False turns this off)")
  return controls + list(runs)


def _format_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(_format_value(v) for v in value)
  return repr(value) if isinstance(value, float) else str(value)  # 0 -> "0.0" for a float key


def run_name(overrides: dict[str, Any]) -> str:
  """A readable, filesystem-safe directory name for a run, e.g. `prune.target=0.5__seed=1`; a
  name changed (characters outside [A-Za-z0-9._,=+-]) or cut gets a hash of the full one."""
  if not overrides:
    return "default"
  full = "__".join(f"{k}={_format_value(v)}" for k, v in overrides.items())
  name = re.sub(r"[^A-Za-z0-9._,=+-]", "-", full)
  if name != full or len(name) > MAX_NAME_LEN:
    name = f"{name[:MAX_NAME_LEN - 9]}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
  return name


def run_names(runs: Sequence[dict]) -> list[str]:
  """`run_name` for every run, made unique with a hash suffix where two would collide."""
  names = [run_name(r) for r in runs]
  return [f"{n}_{hashlib.sha1(_signature(r).encode()).hexdigest()[:8]}" if names.count(n) > 1
          else n for n, r in zip(names, runs)]


def _say(line: str) -> None:
  """One console line of the sweep (process 0 only; logs hold the details)."""
  if parallel.processes()[0] == 0:
    print(line, file=sys.stderr, flush=True)


def _outcome(run_dir: str) -> str:
  """'validation ppl 11.470 (one-shot 11.750), sparsity 0.800' from a run's results.json."""
  try:
    with open(os.path.join(run_dir, files.RESULTS)) as f:
      r = json.load(f)
    split, ppl = next(iter(r["perplexity"].items()))
    oneshot = trees.get_path(r, ("oneshot", "perplexity", split))
    return (f"{split} ppl {ppl:.3f}" + (f" (one-shot {oneshot:.3f})" if oneshot else "")
            + f", sparsity {r['sparsity']['overall']:.3f}")
  except (OSError, ValueError, KeyError, StopIteration, TypeError):
    return "done"


def _groups(config, rows, configs) -> list[list[int]]:
  """The run indices in the order they go: one by one, or (sweep.batch_runs > 1) groups of
  runs that share a program, with a line for each pending run that has to go alone."""
  k = config.sweep.batch_runs if "sweep" in config else 1
  pending = [i for i, r in enumerate(rows) if r["status"] != "done"]
  if k <= 1 or len(pending) < 2:
    return [[i] for i in range(len(rows))]
  if parallel.processes()[1] > 1:
    _say(f"sweep: sweep.batch_runs={k} with several processes: runs go one after another")
    return [[i] for i in range(len(rows))]
  from blockprune_jax import batched  # pylint: disable=g-import-not-at-top
  found, why = batched.plan_groups([configs[i] for i in pending], k,
                                   names=[rows[i]["name"] for i in pending])
  for j, reason in sorted(why.items()):
    _say(f"sweep: {rows[pending[j]]['name']} runs alone: {reason}")
  done = [[i] for i, r in enumerate(rows) if r["status"] == "done"]
  return done + [[pending[j] for j in g] for g in found]


def _run_group(group, rows, configs, run_fn, save, primary, fail_fast):
  """Runs `group` (row indices): one run with run_fn, several side by side as one program
  (pipeline.run_group). Each row ends done or failed; an interruption marks them all and is
  re-raised."""
  n, rows_ = len(rows), [rows[i] for i in group]
  if len(group) == 1 and parallel.agree(rows_[0]["status"] == "done"):
    log.info("sweep [%d/%d] %s: done already, skipped", group[0] + 1, n, rows_[0]["name"])
    return
  _say(f"[{group[0] + 1}/{n}] {rows_[0]['name']} ..." if len(group) == 1 else
       f"[{','.join(str(i + 1) for i in group)}/{n}] {len(group)} runs side by side: "
       f"{', '.join(r['name'] for r in rows_)} ...")
  for row in rows_:
    os.makedirs(row["workdir"], exist_ok=True)
    if primary:
      files.write_json(os.path.join(row["workdir"], OVERRIDES_JSON), row["overrides"])
    row.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
  save()
  start = time.time()
  try:
    if len(group) == 1:
      run_fn(configs[group[0]], rows_[0]["workdir"])
      outcomes = [None]
    else:
      from blockprune_jax import pipeline  # pylint: disable=g-import-not-at-top
      outcomes = pipeline.run_group([configs[i] for i in group], [r["workdir"] for r in rows_])
  except (KeyboardInterrupt, SystemExit, Preempted, NoSpace):  # a full disk fails every run
    for row in rows_:
      row.update(status="interrupted", seconds=round(time.time() - start, 1))
    save()
    raise
  except Exception as e:  # pylint: disable=broad-except
    outcomes = [e] * len(group)
  for i, row, outcome in zip(group, rows_, outcomes):
    # A run side by side has its share of the group's time in its results (batched.py).
    row["seconds"] = round(outcome["runtime"]["seconds"] if isinstance(outcome, dict)
                           else time.time() - start, 1)
    if isinstance(outcome, Exception):
      row.update(status="failed", error=f"{type(outcome).__name__}: {outcome}")
      save()
      if fail_fast:
        raise outcome
      # A mistake the user can fix is one line; anything else keeps its traceback.
      log.error("sweep: run %s failed, continuing: %s", row["name"], str(outcome) if isinstance(
          outcome, UserError) else "".join(traceback.format_exception(outcome)))
    elif primary and not os.path.exists(os.path.join(row["workdir"], files.RESULTS)):
      row.update(status="failed", error=f"the run returned without writing {files.RESULTS}")
    else:
      row["status"] = "done"
      _say(f"[{i + 1}/{n}] {row['name']}: {_outcome(row['workdir'])} ({row['seconds']:.1f} s)")
  save()


def _write_report(config, workdir):
  """report.md (and its plots to W&B), then the answer on the console; a failure is logged."""
  from blockprune_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  try:
    written = report_lib.write_report(workdir)
    print(f"\nreport (every run, plots): {written['md']}\n\n{written.answer}")
    if "wandb" in config and config.wandb.mode != "disabled":
      from blockprune_jax import wandb_log  # pylint: disable=g-import-not-at-top
      wandb_log.log_report(config, workdir, written)
  except NoSpace:
    raise  # one line, as for the runs (main's exit code for a full disk)
  except Exception:  # pylint: disable=broad-except
    # The runs are the expensive part; a plotting problem must not hide that they finished.
    log.error("sweep: writing the report failed:\n%s", traceback.format_exc())


def run_sweep(config: ml_collections.ConfigDict, workdir: str, runs: Sequence[dict],
              run_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
              fail_fast: bool = False, report: bool = True) -> list[dict]:
  """Runs `runs` and their dense controls in `workdir/<run_name>`; returns sweep.json's rows.
  A finished run is skipped, a failed one recorded (the sweep goes on unless `fail_fast`); Ctrl-C /
  SIGTERM marks the run interrupted and re-raises. `run_fn(config, run_workdir)` runs one run."""
  if run_fn is None:
    from blockprune_jax import pipeline  # pylint: disable=g-import-not-at-top
    run_fn = functools.partial(pipeline.run, echo=False)  # this loop prints a line per run
  workdir = os.path.abspath(workdir)
  primary = parallel.processes()[0] == 0
  os.makedirs(workdir, exist_ok=True)
  # Every run shares one base model trained from scratch once (see base.dir in configs/base.py).
  if "base" in config and "dir" in config.base and not config.base.dir:
    config = config_lib.apply_overrides(config, {"base.dir": os.path.join(workdir, "base")})
  runs = with_controls(config, runs)
  configs = [config_lib.apply_overrides(config, r) for r in runs]  # all type errors before any work
  rows = [{"name": n, "workdir": os.path.join(workdir, n), "overrides": files.plain(r),
           "status": "pending"} for n, r in zip(run_names(runs), runs)]
  for row in rows:
    # An unreadable results.json is no finished run: pipeline.run moves it aside and reruns.
    if files.readable_json(os.path.join(row["workdir"], files.RESULTS)):
      row.update(status="done", reused=True)

  def save():
    if primary:
      files.write_json(os.path.join(workdir, files.SWEEP_JSON), {
          "workdir": workdir, "n_runs": len(rows),
          "counts": {s: sum(r["status"] == s for r in rows)
                     for s in ("done", "failed", "interrupted", "running", "pending")},
          "runs": rows})

  save()
  todo = sum(r["status"] != "done" for r in rows)
  log.info("sweep: %d runs in %s, %d already done, %d to run", len(rows), workdir,
           len(rows) - todo, todo)
  for group in _groups(config, rows, configs):
    _run_group(group, rows, configs, run_fn, save, primary, fail_fast)
  if report and primary:
    _write_report(config, workdir)
  return rows


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from blockprune_jax import quiet  # pylint: disable=g-import-not-at-top
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  quiet.console()
  try:
    parallel.maybe_initialize_distributed()
    fn_list = None if FLAGS.sweep else load_get_sweep(
        config_flags.get_config_filename(FLAGS["config"]))
    runs = expand_sweep(FLAGS.config, FLAGS.sweep, fn_list)
    rows = run_sweep(FLAGS.config, FLAGS.workdir, runs, fail_fast=FLAGS.fail_fast)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  failed = [r for r in rows if r["status"] == "failed"]
  for r in failed:  # which run, and why (its error's first line)
    print(f"failed: {r['name']}: {r['error'].splitlines()[0]}", file=sys.stderr)
  if failed:
    print(f"{len(failed)} of {len(rows)} runs failed (see sweep.json): "
          f"{', '.join(r['name'] for r in failed)}", file=sys.stderr)
    sys.exit(1)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per run.")
  flags.DEFINE_multi_string("sweep", [], "KEY=SPEC, e.g. prune.target=0.3,0.5 or "
                            "prune.ratios=0,0.5:0,0.5:0,0.5 (repeat for a product).")
  flags.DEFINE_bool("fail_fast", False, "Stop at the first failed run instead of continuing.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
