"""Checkpoints of the whole training state with Orbax, and a clean stop on preemption.

A run killed at any moment (SIGKILL, or the SIGTERM a preempted Cloud TPU VM gets) restarts
from its latest checkpoint and continues exactly: the saved state is the full pytree
(params, optax state, masks, step, data position, raw uint32 rng key) plus a small JSON dict of
metadata (metrics so far, best validation perplexity, ...).

Typical use in a train loop::

  ckpt = Checkpointer(f'{workdir}/checkpoints', every_steps=config.checkpoint.every_steps)
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(state)
  with PreemptionFlag() as flag:
    for step in range(start, num_steps):
      state = train_step(state, ...)
      ckpt.save(step, state, meta, metric=val_ppl_if_evaluated_this_step)
      if flag.check(step):
        ckpt.save(step, state, meta, force=True)
        break
  ckpt.save(step, state, meta, force=True)
  ckpt.close()

What protects the checkpoints (Orbax behaviour we rely on, checked against orbax 0.12.8):
  * A step is written to `<step>.orbax-checkpoint-tmp-<time>/` and renamed to `<step>/` only once
    every host has finished (on GCS a `commit_success.txt` marks it instead). Orbax never lists a
    temporary directory as a step, so a half-written checkpoint is never restored; leftovers
    from a killed run are removed when the next run starts (`cleanup_tmp_directories`). We also
    skip step directories lacking the metadata file Orbax writes last (see STEP_METADATA_FILE).
  * Old steps are deleted only after the new step has been committed (`_finalize` waits for the
    write, which raises if it failed, before deleting), and an existing step is never
    overwritten. A run that dies mid-save therefore keeps its previous good checkpoints.
  * `save` refuses parameters with NaN or Inf, so a diverged step never displaces good ones.
"""

import logging as std_logging
import math
import os
import signal
import threading

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_decision_lib

METRIC = 'perplexity'  # the name under which Orbax stores the best-keeping metric (lower is better)
# Orbax writes this file into a step's temporary directory just before renaming it into place.
# A step directory without it was not made by a completed save (e.g. an interrupted copy on a
# filesystem whose rename is not atomic, such as gcsfuse), so it is never restored.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'


class Checkpointer:
  """Saves the training state every `every_steps` steps; keeps the last `keep` plus the best.

  `directory` is `workdir/checkpoints`. Every process calls every method (Orbax coordinates
  multi-host writes itself); nothing here writes files outside Orbax.
  """

  def __init__(self, directory, keep=2, every_steps=500, keep_best=True):
    if keep < 1:
      raise ValueError(f'keep must be >= 1 so the latest checkpoint survives, got {keep}')
    if every_steps < 1:
      raise ValueError(f'every_steps must be >= 1, got {every_steps}')
    _quiet_orbax_logging()
    best_fn = lambda metrics: metrics[METRIC]
    # `max_to_keep` together with `best_fn` keeps the N *best* steps only, which could delete the
    # latest one. "The last N plus the best" is the union of two preservation policies.
    keep_policies = [preservation_lib.LatestN(n=keep)]
    if keep_best:
      keep_policies.append(preservation_lib.BestN(
          get_metric_fn=best_fn, reverse=True, n=1,  # reverse: lower perplexity is better
          keep_checkpoints_without_metrics=False))  # LatestN already guards those
    options = ocp.CheckpointManagerOptions(
        # An explicit policy: Orbax's default would also save the very first step of a fresh run.
        save_decision_policy=save_decision_lib.AnySavePolicy([
            save_decision_lib.FixedIntervalPolicy(every_steps),
            # Saves at jax's multi-host preemption sync point even if the caller misses it.
            save_decision_lib.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=preservation_lib.AnyPreservationPolicy(keep_policies),
        # `best_fn` (not used for deletion here) makes Orbax write each step's metric to disk,
        # so a resumed run still knows which step was best.
        best_fn=best_fn if keep_best else None,
        best_mode='min',
        cleanup_tmp_directories=True,
    )
    self.directory = os.fspath(directory)
    self.keep_best = keep_best
    self._manager = ocp.CheckpointManager(
        os.path.abspath(self.directory), options=options, item_names=('state', 'meta'))
    # Checked once: steps this process saves later are tracked by Orbax itself.
    self._incomplete = {step for step in self._manager.all_steps() if not (
        self._manager.directory / str(step) / STEP_METADATA_FILE).exists()}
    if self._incomplete:
      logging.warning('Ignoring incomplete checkpoint steps %s in %s (no %s); delete them to '
                      'silence this.', sorted(self._incomplete), self.directory,
                      STEP_METADATA_FILE)

  def latest_step(self):
    """The newest complete step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self):
    """All complete steps (and those this process is still writing), ascending."""
    return sorted(set(self._manager.all_steps()) - self._incomplete)

  def best_step(self):
    """The committed step with the lowest saved metric, or None."""
    return self._manager.best_step() if self.keep_best else None

  def restore(self, target_state, step=None):
    """Restores `step` (default: the latest) into the structure, dtypes and shardings of
    `target_state` (e.g. a freshly initialised state). Returns (state, meta dict)."""
    self.wait()  # a step this process is still writing is not readable yet
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint to restore in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return restored['state'], dict(restored['meta'] or {})

  def save(self, step, state, meta=None, metric=None, force=False):
    """Saves `state` and the JSON-able `meta` at `step` if it is a save step (a multiple of
    `every_steps` or jax's preemption sync point) or `force` is set.

    `metric` (validation perplexity, lower is better) ranks the step for best-keeping; leave it
    None on steps without an evaluation. Returns whether a save was started: False when it is no
    save step, the step is already saved, or the parameters hold NaN/Inf. The write continues in
    the background; the device arrays are copied to host before this returns, so `state` may be
    donated to the next step at once.
    """
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    if step in self._manager.all_steps():  # e.g. a forced save right after an interval save
      return False
    if not params_are_finite(state):
      logging.error('Step %d: parameters hold NaN or Inf; not saving (the last good checkpoint '
                    'is kept).', step)
      return False
    metrics = None
    if self.keep_best and metric is not None and math.isfinite(float(metric)):
      metrics = {METRIC: float(metric)}
    return self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))),
        metrics=metrics, force=True)

  def wait(self):
    """Blocks until the background write (and the deletions after it) has finished."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def params_are_finite(state):
  """Whether every float leaf of `state['params']` (of `state` if it has no 'params') is finite.

  Only parameters are checked: other state may hold legitimate infinities (e.g. a "best so far"
  initialised to inf)."""
  params = state['params'] if isinstance(state, dict) and 'params' in state else state
  return bool(_all_finite(params))


class PreemptionFlag:
  """Tells the train loop to save and stop: on SIGTERM (one process) or, with several processes,
  at jax's preemption sync point.

  Use as a context manager and call `check(step)` once per step on every process. With one
  process a SIGTERM handler sets `requested`; the previous handler is put back on exit. With
  several processes the decision must be the same on all of them, so it comes from
  `multihost_utils.reached_preemption_sync_point(step)`: jax's own preemption notifier catches the
  SIGTERM on the preempted host and agrees a step with the others. Installing a Python handler
  there would replace jax's (installed from C) and break that agreement, so none is installed.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self.requested = False
    self._signals = tuple(signals)
    self._previous = {}

  def install(self):
    if jax.process_count() > 1:
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning('PreemptionFlag: signal handlers can only be set from the main thread; '
                      'SIGTERM will not trigger a final checkpoint.')
      return self
    for sig in self._signals:
      if signal.getsignal(sig) is None:
        # A handler set outside Python (e.g. jax.distributed's preemption notifier): it cannot be
        # restored once replaced, and the sync point in `check` already covers it.
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    # Only set a flag: the handler runs between bytecodes, possibly inside a save.
    self.requested = True
    logging.warning('Received signal %d: will save a checkpoint and stop.', signum)

  def check(self, step):
    """Returns True once the loop should save and stop; call it at every step on every process."""
    if not self.requested and not self._previous and _reached_preemption_sync_point(step):
      self.requested = True
      logging.warning('Step %d: reached the preemption sync point; saving and stopping.', step)
    return self.requested

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()


def _reached_preemption_sync_point(step):
  """jax's multi-host preemption agreement, False where it does not exist (no jax.distributed,
  preemption service disabled, or the API moved)."""
  try:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))
  except (ImportError, AttributeError, RuntimeError):
    return False


class _OrbaxInfoFilter(std_logging.Filter):
  """Drops Orbax's per-save INFO lines (dozens per checkpoint) and its warning that a step was
  saved without a metric (expected: only evaluation steps carry one). Other warnings pass."""

  def filter(self, record):
    if 'orbax' not in record.pathname.replace(os.sep, '/').split('/'):
      return True
    return (record.levelno >= std_logging.WARNING
            and 'did not provide metrics' not in record.getMessage())


def _quiet_orbax_logging():
  absl_logger = std_logging.getLogger('absl')  # Orbax logs through absl.logging
  if not any(isinstance(f, _OrbaxInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxInfoFilter())
