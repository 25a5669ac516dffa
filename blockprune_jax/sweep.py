r"""Run a grid of experiments, one workdir each, then write the report.

    python -m blockprune_jax.sweep --config=configs/blocks.py --workdir=runs/grid \
        --sweep=prune.ratios=0,0.3,0.6:0,0.3,0.6:0,0.3,0.6 --sweep=seed=0,1 \
        [--config.train.steps=200 ...]

`--sweep=KEY=SPEC` (repeatable; the flags' cartesian product is taken, first flag slowest):

* scalar key: comma-separated values, `prune.target=0.3,0.5,0.7` (3 runs);
* tuple key: colon-separated positions, each a comma-separated list of choices whose product is
  taken, `prune.ratios=0,0.3,0.6:0,0.3,0.6:0,0.3,0.6` (27 tuples). `|` joins alternatives that are
  not a product: `prune.ratios=.1:.2:.3|.1:.18:.32` (2 tuples).

Values are parsed to the type of the key's value in the config (bool, int, float, str, tuple).

Without `--sweep`, a config file may list its runs itself (big_vision's `get_hyper` idea):

    def get_sweep(arg=None):  # arg: what follows ':' in --config=path.py:arg
      return [{"prune.ratios": (0.1, 0.18, 0.32), "seed": s} for s in range(3)]

`--sweep` flags, when given, replace `get_sweep` (they are not crossed with it). With neither, the
sweep is one run with the config as it is.

Each run lives in `<workdir>/<name>/` (the name spells its overrides, e.g.
`prune.ratios=0.0,0.3,0.6__seed=1`) with an `overrides.json`. Runs go one after another in the
order listed (with `sweep.batch_runs=K` > 1, groups of up to K runs that share a program go side
by side: blockprune_jax/batched.py); a run whose `results.json` exists is skipped, so re-running a killed sweep continues
it (an interrupted run resumes from its own checkpoint). `<workdir>/sweep.json` lists every run
and its status. Every run shares one from-scratch base model in `<workdir>/base` (`base.dir`)
unless the config sets `base.dir`. At the end, `report.write_report(workdir)` writes the tables and
plots.
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

RESULTS = "results.json"
SWEEP_JSON = "sweep.json"
OVERRIDES_JSON = "overrides.json"
MAX_NAME_LEN = 120  # keeps paths well below filesystem limits (255 per component)

# ----------------------------------------------------------------------------------------------
# Expanding specs into runs
# ----------------------------------------------------------------------------------------------


def parse_spec(config: ml_collections.ConfigDict, spec: str) -> tuple[str, list[Any]]:
  """`KEY=SPEC` -> (key, values typed like the key). See the module docstring for SPEC."""
  if "=" not in spec:
    raise UserError(f"sweep: '--sweep={spec}' needs the form KEY=VALUES, "
                    "e.g. --sweep=prune.target=0.3,0.5")
  key, text = spec.split("=", 1)
  key = config_lib.strip_prefix(key.strip())  # also the spelling of --config.a.b overrides
  current = config_lib.lookup(config, key)
  if isinstance(current, (tuple, list)):
    values = []
    for alternative in text.split("|"):
      if not alternative.strip():
        values.append(())
        continue
      positions = [[c for c in pos.split(",") if c.strip()] for pos in alternative.split(":")]
      for i, choices in enumerate(positions):
        if not choices:
          raise UserError(f"sweep: '--sweep={spec}': position {i} of '{alternative}' is empty")
      for combo in itertools.product(*positions):
        values.append(config_lib.parse_text(key, ",".join(combo), current))
  else:
    values = [config_lib.parse_text(key, v, current) for v in text.split(",")]
  if not values:
    raise UserError(f"sweep: '--sweep={spec}' lists no values")
  return key, values


def load_get_sweep(config_path: str) -> list[dict] | None:
  """Calls `get_sweep(arg)` of the config file `path.py[:arg]`; None if the file has none."""
  path, _, arg = config_path.partition(":")
  if not os.path.exists(path):
    raise UserError(f"sweep: config file '{path}' not found")
  module = config_lib.load_file(path, "_blockprune_sweep_config")
  get_sweep = getattr(module, "get_sweep", None)
  if get_sweep is None:
    return None
  runs = get_sweep(arg) if arg else get_sweep()
  if not isinstance(runs, (list, tuple)) or not all(isinstance(r, dict) for r in runs):
    raise UserError(f"sweep: get_sweep() in '{path}' must return a list of dicts "
                    "(dotted config key -> value)")
  return list(runs)


def expand_sweep(config: ml_collections.ConfigDict, specs: Sequence[str] | None,
                 sweep_fn_list: Sequence[dict] | None) -> list[dict]:
  """The runs of a sweep, each a dict {dotted key: typed value}.

  Args:
    config: the base config (its values give the types).
    specs: `--sweep` strings `KEY=SPEC`; if any, their cartesian product is the sweep and
      `sweep_fn_list` is ignored.
    sweep_fn_list: what the config file's `get_sweep()` returned, or None.

  Returns:
    The runs in order, duplicates removed; `[{}]` (one run, no overrides) when there is nothing
    to sweep.
  """
  if specs:
    if sweep_fn_list:
      log.info("sweep: --sweep flags given; the config file's get_sweep() is not used")
    parsed = [parse_spec(config, s) for s in specs]
    keys = [k for k, _ in parsed]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
      raise UserError(f"sweep: key(s) {', '.join(sorted(dup))} given in more than one --sweep; "
                      "list all values in one flag")
    runs = [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in parsed))]
  elif sweep_fn_list:
    runs = []
    for overrides in sweep_fn_list:
      run = {}
      for key, value in overrides.items():
        key = config_lib.strip_prefix(key)
        run[key] = config_lib.coerce(key, value, config_lib.lookup(config, key))
      runs.append(run)
  else:
    runs = [{}]
  unique, seen = [], set()
  for run in runs:
    sig = json.dumps(files.plain(run), sort_keys=True)
    if sig in seen:
      log.warning("sweep: dropping a duplicate run %s", run)
      continue
    seen.add(sig)
    unique.append(run)
  return unique


# ----------------------------------------------------------------------------------------------
# Run names and bookkeeping
# ----------------------------------------------------------------------------------------------


def with_controls(config: ml_collections.ConfigDict, runs: Sequence[dict]) -> list[dict]:
  """`runs` preceded by the dense controls a fair pruning study needs (`sweep.controls`).

  A pruned run that fine-tunes is compared with the dense model fine-tuned with the same steps,
  data and schedule: its overrides without the `prune.*` keys, with prune.method=none and
  role=control. One control per distinct such setting (e.g. per seed); none where the sweep
  already holds that dense run, or where nothing is pruned and fine-tuned.
  """
  if "sweep" in config and not config.sweep.controls:
    return list(runs)
  controls, have = [], {json.dumps(files.plain(r), sort_keys=True) for r in runs}
  dense_drops = keys.where(needs="pruning") | {"role"}
  for run in runs:
    cfg = config_lib.apply_overrides(config, run)
    if cfg.prune.method == "none" or (cfg.train.steps <= 0 and cfg.train.epochs <= 0):
      continue
    control = {k: v for k, v in run.items() if k not in dense_drops}
    control.update({"prune.method": "none", "role": "control"})
    dense = {k: v for k, v in control.items() if k != "role"}
    sigs = {json.dumps(files.plain(c), sort_keys=True) for c in (control, dense)}
    if not sigs & have:
      controls.append(control)
      have |= sigs
  if controls:
    _say(f"sweep: {len(controls)} dense control run(s) added, fine-tuned like the pruned runs "
         "(sweep.controls=False turns this off)", parallel.processes()[0] == 0)
  return controls + list(runs)


def _format_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(_format_value(v) for v in value)
  if isinstance(value, float):
    return repr(value)  # 0.3 -> "0.3", 0 -> "0.0": stable and readable
  return str(value)


def run_name(overrides: dict[str, Any]) -> str:
  """A readable, filesystem-safe directory name for a run, e.g. `prune.target=0.5__seed=1`.

  Characters outside [A-Za-z0-9._,=+-] become '-'; names longer than MAX_NAME_LEN are cut and get
  an 8-character hash of the full name so distinct runs never share a directory.
  """
  if not overrides:
    return "default"
  full = "__".join(f"{k}={_format_value(v)}" for k, v in overrides.items())
  name = re.sub(r"[^A-Za-z0-9._,=+-]", "-", full)
  if name != full or len(name) > MAX_NAME_LEN:
    # Sanitizing or cutting could merge two names; the hash of the full name keeps them apart.
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    name = f"{name[:MAX_NAME_LEN - 9]}_{digest}"
  return name


def run_names(runs: Sequence[dict]) -> list[str]:
  """`run_name` for every run, made unique with a hash suffix where two would collide."""
  names = [run_name(r) for r in runs]
  counts = {n: names.count(n) for n in names}
  out = []
  for name, run in zip(names, runs):
    if counts[name] > 1:
      digest = hashlib.sha1(json.dumps(files.plain(run), sort_keys=True).encode()).hexdigest()[:8]
      name = f"{name}_{digest}"
    out.append(name)
  return out


def _say(line: str, primary: bool) -> None:
  """One console line of the sweep (process 0 only; logs hold the details)."""
  if primary:
    print(line, file=sys.stderr, flush=True)


def _outcome(run_dir: str) -> str:
  """'validation ppl 11.47 (one-shot 11.75), sparsity 0.800' from a run's results.json."""
  try:
    with open(os.path.join(run_dir, RESULTS)) as f:
      r = json.load(f)
    split, ppl = next(iter(r["perplexity"].items()))
    oneshot = trees.get_path(r, ("oneshot", "perplexity", split))
    return (f"{split} ppl {ppl:.3f}" + (f" (one-shot {oneshot:.3f})" if oneshot else "")
            + f", sparsity {r['sparsity']['overall']:.3f}")
  except (OSError, ValueError, KeyError, StopIteration, TypeError):
    return "done"


def _groups(config, rows, configs, primary) -> list[list[int]]:
  """The run indices in the order they go: one by one, or (sweep.batch_runs > 1) groups of
  runs that share a program, with a line for each pending run that has to go alone."""
  k = config.sweep.batch_runs if "sweep" in config else 1
  pending = [i for i, r in enumerate(rows) if r["status"] != "done"]
  if k <= 1 or len(pending) < 2:
    return [[i] for i in range(len(rows))]
  if parallel.processes()[1] > 1:
    _say(f"sweep: sweep.batch_runs={k} with several processes: runs go one after another",
         primary)
    return [[i] for i in range(len(rows))]
  from blockprune_jax import batched  # pylint: disable=g-import-not-at-top
  found, why = batched.plan_groups([configs[i] for i in pending], k,
                                   names=[rows[i]["name"] for i in pending])
  for j, reason in sorted(why.items()):
    _say(f"sweep: {rows[pending[j]]['name']} runs alone: {reason}", primary)
  done = [[i] for i, r in enumerate(rows) if r["status"] == "done"]
  return done + [[pending[j] for j in g] for g in found]


def _start(row, primary, line, save):
  os.makedirs(row["workdir"], exist_ok=True)
  if primary:
    files.write_json(os.path.join(row["workdir"], OVERRIDES_JSON), row["overrides"])
  if line:
    _say(line, primary)
  row.update(status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"))
  row.pop("error", None)
  save()


def _failed(row, e, seconds, save, fail_fast):
  row.update(status="failed", seconds=seconds, error=f"{type(e).__name__}: {e}")
  save()
  if fail_fast:
    raise e
  # A mistake the user can fix is one line; anything else keeps its traceback.
  detail = (str(e) if isinstance(e, UserError) else
            "".join(traceback.format_exception(type(e), e, e.__traceback__)))
  log.error("sweep: run %s failed, continuing: %s", row["name"], detail)


def _ended(row, i, n, seconds, primary):
  """Marks a run that returned done (or failed, without its results.json) and says so."""
  row["seconds"] = seconds
  if primary and not os.path.exists(os.path.join(row["workdir"], RESULTS)):
    row.update(status="failed", error=f"the run returned without writing {RESULTS}")
  else:
    row["status"] = "done"
    _say(f"[{i + 1}/{n}] {row['name']}: {_outcome(row['workdir'])} ({seconds:.1f} s)", primary)


def _run_side_by_side(group, rows, configs, save, primary, fail_fast):
  """One group of runs as one program (pipeline.run_group); each row ends done or failed."""
  from blockprune_jax import pipeline  # pylint: disable=g-import-not-at-top
  n = len(rows)
  _say(f"[{','.join(str(i + 1) for i in group)}/{n}] {len(group)} runs side by side: "
       f"{', '.join(rows[i]['name'] for i in group)} ...", primary)
  for i in group:
    _start(rows[i], primary, "", save)
  start = time.time()
  try:
    outcomes = pipeline.run_group([configs[i] for i in group],
                                  [rows[i]["workdir"] for i in group])
  except (KeyboardInterrupt, SystemExit, Preempted, NoSpace):
    for i in group:
      rows[i].update(status="interrupted", seconds=round(time.time() - start, 1))
    save()
    raise
  except Exception as e:  # pylint: disable=broad-except
    outcomes = [e] * len(group)
  for i, outcome in zip(group, outcomes):
    # A run's results hold its share of the group's time (batched.py).
    seconds = round(outcome["runtime"]["seconds"] if isinstance(outcome, dict)
                    else time.time() - start, 1)
    if isinstance(outcome, Exception):
      _failed(rows[i], outcome, seconds, save, fail_fast)
    else:
      _ended(rows[i], i, n, seconds, primary)
  save()


def _run_alone(i, rows, configs, run_fn, save, primary, fail_fast):
  """Run i by itself (run_fn); its row ends done, failed or (re-raised) interrupted."""
  row = rows[i]
  if parallel.agree(row["status"] == "done"):
    log.info("sweep [%d/%d] %s: done already, skipped", i + 1, len(rows), row["name"])
    return
  _start(row, primary, f"[{i + 1}/{len(rows)}] {row['name']} ...", save)
  start = time.time()
  try:
    run_fn(configs[i], row["workdir"])
  except (KeyboardInterrupt, SystemExit, Preempted, NoSpace):  # a full disk fails every run
    row.update(status="interrupted", seconds=round(time.time() - start, 1))
    save()
    raise
  except Exception as e:  # pylint: disable=broad-except
    _failed(row, e, round(time.time() - start, 1), save, fail_fast)
    return
  _ended(row, i, len(rows), round(time.time() - start, 1), primary)
  save()


def _write_report(config, workdir):
  """report.md (and its plots to W&B); a failure is logged, not raised."""
  from blockprune_jax import report as report_lib  # pylint: disable=g-import-not-at-top
  try:
    written = report_lib.write_report(workdir)
    print(f"\n{written.table}\n\nreport: {os.path.join(workdir, 'report.md')}")
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
  """Runs `runs` one after another, each in `workdir/<run_name>`; returns their status rows.

  A run whose results.json exists is skipped. A run that raises is recorded as `failed` and the
  sweep goes on (unless `fail_fast`); Ctrl-C / SIGTERM-as-KeyboardInterrupt marks the run
  `interrupted`, writes sweep.json and re-raises. `workdir/sweep.json` is rewritten after every
  change. At the end `report.write_report(workdir)` is called (if `report`).

  Args:
    config: the base config (already holding any --config.* overrides).
    workdir: the sweep's directory.
    runs: from `expand_sweep`.
    run_fn: `run_fn(config, run_workdir)`; default `blockprune_jax.pipeline.run`. Groups of
      runs side by side (sweep.batch_runs > 1) go through `pipeline.run_group` instead.
    fail_fast: re-raise the first failure instead of continuing.
    report: write the report at the end.
  """
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
  names = run_names(runs)
  configs = [config_lib.apply_overrides(config, r) for r in runs]  # all type errors before any work
  rows = [{"name": n, "workdir": os.path.join(workdir, n), "overrides": files.plain(r),
           "status": "pending"} for n, r in zip(names, runs)]
  for row in rows:
    # An unreadable results.json is no finished run: pipeline.run moves it aside and reruns.
    if files.readable_json(os.path.join(row["workdir"], RESULTS)):
      row.update(status="done", reused=True)

  def save():
    if primary:
      files.write_json(os.path.join(workdir, SWEEP_JSON),
                  {"workdir": workdir, "n_runs": len(rows),
                   "counts": {s: sum(r["status"] == s for r in rows)
                              for s in ("done", "failed", "interrupted", "running", "pending")},
                   "runs": rows})

  save()
  todo = sum(r["status"] != "done" for r in rows)
  log.info("sweep: %d runs in %s, %d already done, %d to run", len(rows), workdir,
           len(rows) - todo, todo)
  for group in _groups(config, rows, configs, primary):
    if len(group) > 1:
      _run_side_by_side(group, rows, configs, save, primary, fail_fast)
    else:
      _run_alone(group[0], rows, configs, run_fn, save, primary, fail_fast)
  if report and primary:
    _write_report(config, workdir)
  return rows


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  from blockprune_jax import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_console()
  try:
    parallel.maybe_initialize_distributed()
    config = FLAGS.config
    config_path = config_flags.get_config_filename(FLAGS["config"])
    fn_list = None if FLAGS.sweep else load_get_sweep(config_path)
    runs = expand_sweep(config, FLAGS.sweep, fn_list)
    rows = run_sweep(config, FLAGS.workdir, runs, fail_fast=FLAGS.fail_fast)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  failed = [r for r in rows if r["status"] == "failed"]
  for r in failed:  # which run, and why (its error's first line)
    print(f"failed: {r['name']}: {((r.get('error') or '').splitlines() or [''])[0]}",
          file=sys.stderr)
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
