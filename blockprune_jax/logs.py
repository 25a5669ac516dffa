"""What a run says: JSON lines in the workdir (`log.jsonl` events, `metrics.jsonl` numbers over
steps), TensorBoard where tensorboardX is installed, and W&B when config.wandb.mode is on (see
wandb_log.py; a resumed workdir continues the same W&B run). Only process 0 writes.
"""
import contextlib
import json
import os
import sys
import threading
import time
import traceback

import jax

from blockprune_jax import files
from blockprune_jax import quiet
from blockprune_jax import wandb_log


class RunLog(contextlib.AbstractContextManager):
  """Appends events and metrics to the workdir; prints a one-line form of each event. Leaving
  its `with` block by an exception closes the W&B run as failed."""

  def __init__(self, workdir: str, echo: bool = True, config=None):
    self.workdir = workdir
    self.echo = echo
    self.active = jax.process_index() == 0
    self._tb = None
    self._tb_dir = os.path.join(workdir, "tb")
    self._wandb = None
    if config is not None:
      wandb_log.check_mode(config)  # every process fails alike on a bad wandb.mode
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      # First, so that a W&B problem (no login, no package) fails before anything is opened.
      self._wandb = wandb_log.start(config, workdir)  # None unless wandb.mode is on
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        quiet.chain(threading, "excepthook", _tensorboard_died)
        with files.writing("TensorBoard events", self._tb_dir):
          self._tb = SummaryWriter(self._tb_dir)
      except ImportError:  # optional: clu would pull in TensorFlow, tensorboardX does not
        self._tb = None

  def __exit__(self, exc_type, exc, tb):
    self.close(exit_code=0 if exc_type is None else 1)

  def event(self, kind: str, message: str = "", **fields):
    if not self.active:
      return
    self._append("log.jsonl", {"time": round(time.time(), 3), "event": kind, **fields})
    if self.echo and message:
      print(f"[blockprune] {message}", file=sys.stderr, flush=True)
    if kind == "preempted" and self._wandb is not None:
      self._wandb.preempting()  # W&B marks the run preempted (a sweep requeues it), not crashed

  def metric(self, step: int, split: str, **values):
    if not self.active:
      return
    self._append("metrics.jsonl", {"step": int(step), "split": split, **values})
    if self._tb is not None:
      if _TB_NO_SPACE:  # tensorboardX's writer thread died of a full disk: its queue would block
        self._tb = None
        raise files.no_space_error("TensorBoard events", self._tb_dir, _TB_NO_SPACE[0])
      for k, v in values.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(f"{split}/{k}", v, step)
    if self._wandb is not None:
      self._wandb.metric(step, split, values)

  def finish(self, results: dict, images=()):
    """Called once with the run's final results (results.json), before close(); `images` are
    plot files to attach to the W&B run."""
    if self._wandb is not None:
      self._wandb.summarize(results)
      if images:
        self._wandb.images(list(images))

  def close(self, exit_code: int = 0):
    """Closes TensorBoard and finishes the W&B run (exit_code != 0: marked failed)."""
    if self._tb is not None:
      if not _TB_NO_SPACE:  # a dead writer thread would never take the closing event
        self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.close(exit_code=exit_code)
      self._wandb = None

  def _append(self, name, record):
    files.append_line(os.path.join(self.workdir, name),
                      json.dumps(record, default=files.to_jsonable))


_TB_NO_SPACE = []  # the reason tensorboardX's writer thread died of, if it did


def _tensorboard_died(args):
  """tensorboardX's writer thread died of a full disk: recorded, not printed (RunLog then ends
  the run in one line)."""
  reason = files.no_space_reason(args.exc_value)
  frames = traceback.extract_tb(args.exc_traceback)
  if reason and any("tensorboardX" in frame.filename for frame in frames):
    _TB_NO_SPACE.append(reason)
    return True
  return False
