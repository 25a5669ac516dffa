"""Weights & Biases logging (optional): one W&B run per workdir, resumed along with the workdir.

`wandb` is imported only when wandb.mode is not `disabled`, so a plain install never needs it.
`RunLog` (logs.py) calls `start()` on process 0 and forwards metrics, results.json and plots to the
returned `WandbRun`. The run id is kept in `<workdir>/wandb_id`, so running the same command again
after an interruption continues the same W&B run; W&B's own files go to `<workdir>/wandb/`.
`log_report()` adds one run named "report" to a sweep's group with the sweep's tables and plots.
"""
import csv
import os
import re

from blockprune_jax import config_lib
from blockprune_jax import files
from blockprune_jax.errors import NoSpace, UserError, one_line

MODES = ("disabled", "online", "offline")
ID_FILE = "wandb_id"  # in the workdir: the W&B run id a resumed run continues
REPORT_ID_FILE = "wandb_report_id"  # in a sweep's workdir: the id of its "report" run
MIN_VERSION = (0, 19, 10)  # reinit="create_new": a base run nested in a run needs two live runs
_INSTALL = f"pip install 'wandb>={'.'.join(map(str, MIN_VERSION))}'"

# Runs started here and not yet closed, by id. A pipeline that died by an exception never closes
# its log; when the same workdir is run again in this process, its stale run is finished first.
_OPEN = {}


def check_mode(config) -> str:
  """config.wandb.mode, or a one-line UserError naming the key."""
  mode = config.wandb.mode
  if mode not in MODES:
    raise UserError(f"wandb.mode={mode!r} is not one of {', '.join(MODES)}")
  return mode


def enabled(config) -> bool:
  return config is not None and check_mode(config) != "disabled"


def import_wandb(mode: str):
  """The wandb module, or a UserError saying how to install it (or turn it off)."""
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f"wandb.mode={mode} needs the wandb package: {_INSTALL}, or set "
                    "--config.wandb.mode=disabled") from None
  if tuple(int(x) for x in re.findall(r"\d+", wandb.__version__)[:3]) < MIN_VERSION:
    raise UserError(f"wandb {wandb.__version__} is too old for wandb.mode={mode}: {_INSTALL}, "
                    "or set --config.wandb.mode=disabled")
  return wandb


def group_for(config, workdir: str):
  """wandb.group, else the sweep's name for a run inside a sweep's workdir, else None."""
  if config.wandb.group:
    return config.wandb.group
  parent = os.path.dirname(os.path.abspath(workdir))
  # A sweep writes sweep.json before its first run, so its runs (and the shared base model in
  # <sweep>/base) land in one group named like log_report()'s, without the sweep passing it on.
  return os.path.basename(parent) if os.path.isfile(os.path.join(parent, files.SWEEP_JSON)) else None


def read_id(path: str):
  """The saved run id, or None when there is none yet."""
  try:
    with open(path) as f:
      return f.read().strip() or None
  except FileNotFoundError:
    return None


def write_id(path: str, run_id: str):
  """Writes the id atomically: a crash mid-write must not leave a half id to resume."""
  with files.atomic_path(path, "the W&B run id") as tmp, open(tmp, "w") as f:
    f.write(run_id + "\n")


def start(config, workdir: str):
  """Starts (or resumes) the W&B run of `workdir`; None when wandb.mode is disabled."""
  if not enabled(config):
    return None
  wandb = import_wandb(config.wandb.mode)
  id_path = os.path.join(workdir, ID_FILE)
  saved = read_id(id_path)
  if saved in _OPEN:
    _OPEN[saved].close(exit_code=1)
  name = os.path.basename(os.path.abspath(workdir))
  # Under a W&B sweep agent the workdir is named after the run id; W&B's readable name is nicer.
  if name == (saved or os.environ.get("WANDB_RUN_ID")):
    name = None
  run = _resume(wandb, config, id_path, saved, group=group_for(config, workdir), name=name,
                job_type=config.role, dir=workdir)
  return WandbRun(wandb, run)


def _resume(wandb, config, id_path, saved, **kwargs):
  """init_run resuming the id `saved` (read from `id_path`); a new id is kept there."""
  run = init_run(wandb, config.wandb.mode, project=config.wandb.project or None,
                 entity=config.wandb.entity or None, run_id=saved, config=config.to_dict(),
                 **kwargs)
  if run.id != saved:
    write_id(id_path, run.id)
  return run


def init_run(wandb, mode, *, run_id, **kwargs):
  """wandb.init that resumes `run_id` (None: a new run, or the sweep agent's WANDB_RUN_ID)."""
  try:
    with files.writing("the W&B run directory", kwargs.get("dir") or os.getcwd()):
      return wandb.init(mode=mode, id=run_id, resume="allow", reinit="create_new", **kwargs)
  except NoSpace:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # No API key, no network, a bad entity: say what to change, in one line.
    raise UserError(f"wandb.init failed ({one_line(e)}): run `wandb login`, or set "
                    "--config.wandb.mode=offline (sync later with `wandb sync`) or disabled"
                    ) from None


class WandbRun:
  """One live W&B run; RunLog forwards to it."""

  def __init__(self, wandb, run):
    self.wandb, self.run, self.id = wandb, run, run.id
    _OPEN[self.id] = self

  def metric(self, step: int, split: str, values: dict):
    """Logs {split/key: value} at `step` (numbers only)."""
    data = {f"{split}/{k}": v for k, v in ((k, _number(v)) for k, v in values.items())
            if v is not None}
    # A resumed run replays the steps after its last checkpoint; W&B already holds those (it
    # drops steps below its counter, with a warning each), so they are skipped here.
    if data and step >= self.run.step:
      self.run.log(data, step=int(step))

  def summarize(self, results: dict):
    """results.json into the run summary, flattened with '/' (the config is logged already)."""
    flat = config_lib.flatten({k: v for k, v in results.items() if k != "config"}, sep="/")
    self.run.summary.update({k: v for k, v in flat.items() if v is not None})

  def images(self, paths, prefix: str = "plots"):
    """Logs the image files among `paths` as `{prefix}/<file stem>`."""
    data = image_dict(self.wandb, paths, prefix)
    if data:
      self.run.log(data)

  def preempting(self):
    """Tells W&B the run will stop and resume (a sweep requeues it rather than count a crash)."""
    self.run.mark_preempting()

  def close(self, exit_code: int = 0):
    if _OPEN.pop(self.id, None) is not None:
      self.run.finish(exit_code=exit_code)


def _number(v):
  """A float/int from a Python or NumPy number; None for anything else."""
  if hasattr(v, "item") and getattr(v, "size", 1) == 1:
    v = v.item()
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return v


def image_dict(wandb, paths, prefix: str) -> dict:
  """{prefix/stem: wandb.Image} for the existing .png/.jpg/.jpeg/.gif files among `paths`."""
  out = {}
  for p in paths:
    stem, ext = os.path.splitext(os.path.basename(p))
    if ext.lower() in (".png", ".jpg", ".jpeg", ".gif") and os.path.isfile(p):
      out[f"{prefix}/{stem}"] = wandb.Image(p)
  return out


def log_report(config, sweep_workdir: str, written):
  """Logs a sweep's report files (`written`: {name: path}, or paths) as a run named "report" in
  the sweep's group: CSVs as tables, images as plots, both saved with the run. Returns the run's
  id (None when disabled), which REPORT_ID_FILE keeps: a report written again updates it."""
  if not enabled(config):
    return None
  wandb = import_wandb(config.wandb.mode)
  paths = [p for p in (written.values() if isinstance(written, dict) else written) if p]
  id_path = os.path.join(sweep_workdir, REPORT_ID_FILE)
  group = config.wandb.group or os.path.basename(os.path.abspath(sweep_workdir))
  run = _resume(wandb, config, id_path, read_id(id_path), group=group, name="report",
                job_type="report", dir=sweep_workdir)
  try:
    data = image_dict(wandb, paths, "plots")
    for p in paths:
      if p.endswith(".csv") and os.path.isfile(p):
        data[f"report/{os.path.splitext(os.path.basename(p))[0]}"] = csv_table(wandb, p)
    if data:
      run.log(data)
    for p in paths:
      if p.endswith((".csv", ".md")) and os.path.isfile(p):
        run.save(os.path.abspath(p), base_path=os.path.dirname(os.path.abspath(p)), policy="now")
  except BaseException:
    run.finish(exit_code=1)
    raise
  run.finish()
  return run.id


def csv_table(wandb, path: str):
  """A wandb.Table of a CSV file: numeric columns as floats (empty cells None), others text."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  if not rows:
    return wandb.Table(columns=["empty"], data=[])
  width = len(rows[0])
  header, body = rows[0], [(r + [""] * width)[:width] for r in rows[1:]]  # ragged rows: padded
  columns = list(zip(*body)) if body else [() for _ in header]
  # W&B tables fix each column's type, so a column is numeric only when every cell is.
  typed = [_numeric_column(c) or [c_ or None for c_ in c] for c in columns]
  return wandb.Table(columns=header, data=[list(r) for r in zip(*typed)] if body else [])


def _numeric_column(cells):
  """The cells as floats (None for empty), or None if any cell is not a number."""
  try:
    return [float(c) if c != "" else None for c in cells]
  except ValueError:
    return None
