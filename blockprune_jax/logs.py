"""What a run says: JSON lines in the workdir (and TensorBoard where tensorboardX is installed).

`log.jsonl` records events (start, devices, config, phases, results); `metrics.jsonl` records
numbers over steps ({"step", "split", "loss", ...}). Only process 0 writes.
"""
import json
import os
import sys
import time

import jax


class RunLog:
  """Appends events and metrics to the workdir; prints a one-line form of each event."""

  def __init__(self, workdir: str, echo: bool = True, config=None):
    self.workdir = workdir
    self.config = config
    self.echo = echo
    self.active = jax.process_index() == 0
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # optional: clu would pull in TensorFlow, tensorboardX does not
        self._tb = None

  def event(self, kind: str, message: str = "", **fields):
    if not self.active:
      return
    self._append("log.jsonl", {"time": round(time.time(), 3), "event": kind, **fields})
    if self.echo and message:
      print(f"[blockprune] {message}", file=sys.stderr, flush=True)

  def metric(self, step: int, split: str, **values):
    if not self.active:
      return
    self._append("metrics.jsonl", {"step": int(step), "split": split, **values})
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, step)

  def finish(self, results: dict):
    """Called once with the run's final results (results.json), before close()."""
    del results

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def _append(self, name, record):
    with open(os.path.join(self.workdir, name), "a") as f:
      f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)
