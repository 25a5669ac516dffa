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

What we add for checkpoints damaged after they were written (a full disk, a bad copy, a file
truncated by hand): every save stores a checksum of the state in its metadata, and `restore`
verifies it. A newest step that cannot be read or fails its checksum is moved aside to
`<directory>.unreadable/<step>-<time>` (never deleted) with a one-line warning, and the next
newest is tried. Orbax alone would not notice: a flipped byte in an array file restores
silently as a wrong number. Orbax's own log records and tracebacks of the failed attempt (its
abandoned asyncio reads, TensorStore callbacks into a closed loop) are dropped: the warning
says it all.

A full disk (or spent quota) while writing a step ends in one `files.no_space_error` line
(NoSpace: main exits with its own code): the step's temporary directory is removed, the
previous complete steps are kept, and the same command resumes from them once space is freed.
`check_free_space` warns before training when the filesystem cannot hold the steps to keep.
"""

import contextlib
import gc
import logging as std_logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_decision_lib

from blockprune_jax import files
from blockprune_jax import parallel
from blockprune_jax.errors import Preempted, UserError

METRIC = 'perplexity'  # the name under which Orbax stores the best-keeping metric (lower is better)
# Orbax writes this file into a step's temporary directory just before renaming it into place.
# A step directory without it was not made by a completed save (e.g. an interrupted copy on a
# filesystem whose rename is not atomic, such as gcsfuse), so it is never restored.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
CHECKSUM = 'checksum'  # the meta key holding the state's checksum (see state_checksum)
# Orbax writes a step into `<step>.orbax-checkpoint-tmp[-<time>]` and renames it when complete.
TMP_MARKER = '.orbax-checkpoint-tmp'


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
    self.keep = keep
    self.keep_best = keep_best
    self._writing_step = None  # the step whose write has not been confirmed yet
    self._failed = False  # a write ran out of space (reported once; close() stays quiet)
    with _orbax_muted():  # a damaged step's metadata is our one warning line when restored
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
    """Restores `step` (default: the newest that restores) into the structure, dtypes and
    shardings of `target_state` (e.g. a freshly initialised state). Returns (state, meta dict).

    Without `step`, a newest step that is unreadable or fails its checksum is moved aside (one
    warning line) and the next newest is tried; UserError if none restores. With `step`, that
    step or a UserError.
    """
    self.wait()  # a step this process is still writing is not readable yet
    if step is not None:
      state, meta, error = self._try_restore(target_state, step)
      if error:
        raise UserError(f'checkpoint step {step} in {self.directory} does not restore ({error})')
      return state, meta
    if self.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint to restore in {self.directory}')
    while (step := self.latest_step()) is not None:
      state, meta, error = self._try_restore(target_state, step)
      if not parallel.all_ok(not error):
        self._set_aside(step, error or 'unreadable on another process')
        continue
      return state, meta
    raise UserError(f'no checkpoint in {self.directory} restores (each was moved to '
                    f'{self.directory}.unreadable): run the same command again to start over')

  def latest_meta(self) -> dict | None:
    """The JSON metadata of the newest step, read without its arrays; None when there is no
    step or it does not read (restore() then deals with a damaged step)."""
    step = self.latest_step()
    if step is None:
      return None
    try:
      with _orbax_muted():
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored['meta'] or {})
    except Exception:  # pylint: disable=broad-except
      return None
    finally:
      gc.collect()  # as in _try_restore: abandoned reads are collected while muted

  def _try_restore(self, target_state, step):
    """(state, meta, None) if `step` restores and matches its checksum, else (.., reason)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      with _orbax_muted():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      state, meta = restored['state'], dict(restored['meta'] or {})
      saved = meta.pop(CHECKSUM, None)
      if saved is not None and list(saved) != state_checksum(state):
        return None, None, 'its checksum does not match: a file changed after it was written'
    except Exception as e:  # pylint: disable=broad-except
      # Orbax / TensorStore raise many types (ValueError, JSONDecodeError, OSError, ...) for a
      # damaged file; any of them means this step cannot be trusted.
      return None, None, _short_reason(e)
    finally:
      # Orbax's abandoned reads of a failed attempt are collected now, while the filters of
      # _quiet_orbax_logging hold, not at exit where they would print a traceback.
      gc.collect()
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return state, meta, None

  def _set_aside(self, step, reason):
    """Moves step `step` out of the way (never deletes it) and forgets it."""
    aside_root = os.path.abspath(self.directory) + '.unreadable'
    aside = os.path.join(aside_root, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      os.makedirs(aside_root, exist_ok=True)
      os.rename(os.path.join(os.path.abspath(self.directory), str(step)), aside)
    parallel.sync(f'checkpoint step {step} set aside')
    self._manager.reload()
    logging.warning('Checkpoint step %d in %s does not restore (%s); moved it to %s and '
                    'falling back to the previous step.', step, self.directory, reason, aside)

  def check_free_space(self, state):
    """Warns (one line) when the checkpoints' filesystem cannot hold `keep` + 1 saved states of
    `state`: the newest step is written before the oldest is deleted. A state's size is its
    arrays' bytes, or what the newest saved step takes if more (Orbax's metadata, file
    blocks). Steps already saved here count as free, since they make room as new ones come.
    Returns (needed, free) in bytes."""
    per_state = sum(int(x.nbytes) if hasattr(x, 'nbytes') else np.asarray(x).nbytes
                    for x in jax.tree.leaves(state))
    if self.latest_step() is not None:
      per_state = max(per_state, _bytes_under(os.path.join(self.directory,
                                                           str(self.latest_step()))))
    needed = (self.keep + 1) * per_state
    free = files.free_space(self.directory)
    if free is None:
      return needed, None
    free += _bytes_under(self.directory)
    if free < needed:
      logging.warning(
          'Only %s free for checkpoints in %s, but checkpoint.keep=%d + 1 saved states need '
          '%s (%s each): a save will fail for want of space; free space or lower '
          'checkpoint.keep.', files.human_bytes(free), self.directory, self.keep,
          files.human_bytes(needed), files.human_bytes(per_state))
    return needed, free

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
    meta = dict(meta or {}, **{CHECKSUM: state_checksum(state)})
    with self._writes():
      self._manager.wait_until_finished()  # an earlier step's failed write shows here
      self._writing_step = step
      return self._manager.save(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)

  def wait(self):
    """Blocks until the background write (and the deletions after it) has finished."""
    with self._writes():
      self._manager.wait_until_finished()

  def close(self):
    if self._failed:  # Orbax would raise the reported failure again
      with contextlib.suppress(Exception):
        self._manager.close()
      if jax.process_index() == 0:
        remove_partial_steps(self.directory, quiet_s=1.0)  # what late writers left
      return
    with self._writes():
      self._manager.close()

  def _writes(self):
    """A full disk while Orbax writes (its error may surface at a later call): one NoSpace
    line naming the step, after the partial step is removed."""
    return files.writing(lambda: f'checkpoint step {self._writing_step}', self.directory,
                         cleanup=self._after_failed_write)

  def _after_failed_write(self):
    self._failed = True
    # A failed save can leave Orbax's other writers of the step running (its metadata, the
    # next item): once they stop, nothing recreates the directory removed below.
    with contextlib.suppress(Exception):
      self._manager.wait_until_finished()
    gc.collect()  # Orbax's abandoned write coroutines close now, not noisily at exit
    if jax.process_index() == 0:
      remove_partial_steps(self.directory)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def _leaf_checksum(x):
  """A uint32 checksum of one array's bits: sum of bits * odd position weights, mod 2**32.

  Integer addition mod 2**32 is associative, so the result does not depend on how XLA orders
  the reduction (same on any device count); any single changed bit changes it (odd weights).
  """
  x = jnp.ravel(jnp.asarray(x))
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jnp.ravel(jax.lax.bitcast_convert_type(x, width)).astype(jnp.uint32)
  weights = (jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761)) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _checksums(tree):
  leaves = jax.tree.leaves(tree)
  return jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)


def _host(x):
  """A leaf as numpy (this process's copy of an array replicated over processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def state_checksum(state) -> list:
  """[uint32 per leaf] of `state` (arrays, numpy or Python scalars), as JSON-able ints.

  Computed where the state lives (a replicated training state: on its devices, no copy); leaves
  on different devices, as Orbax restores them (each where it was saved from), go via the host.
  """
  try:
    out = _checksums(state)
  except ValueError:  # jit refuses arguments committed to different devices
    out = _checksums(jax.tree.map(_host, state))
  if hasattr(out, 'addressable_data'):  # replicated over processes: read the local copy
    out = out.addressable_data(0)
  return [int(v) for v in np.asarray(out)]


def params_are_finite(state):
  """Whether every float leaf of `state['params']` (of `state` if it has no 'params') is finite.

  Only parameters are checked: other state may hold legitimate infinities (e.g. a "best so far"
  initialised to inf)."""
  params = state['params'] if isinstance(state, dict) and 'params' in state else state
  return bool(_all_finite(params))


class PreemptionFlag:
  """Tells the train loop to save and stop: on SIGTERM or SIGINT (Ctrl-C) with one process or,
  with several processes, at jax's preemption sync point.

  Use as a context manager and call `check(step)` once per step on every process. With one
  process a handler for each signal sets `requested`; the previous handlers are put back on
  exit. A second Ctrl-C stops at once (KeyboardInterrupt; the last checkpoint is kept). With
  several processes the decision must be the same on all of them, so it comes from
  `multihost_utils.reached_preemption_sync_point(step)`: jax's own preemption notifier catches the
  SIGTERM on the preempted host and agrees a step with the others. Installing a Python handler
  there would replace jax's (installed from C) and break that agreement, so none is installed
  for SIGTERM; a Ctrl-C there is turned into a SIGTERM to this process, for the same agreement.

  `signum` is the signal that asked to stop (SIGTERM when it came from the sync point) and
  `error(message)` the exception the loop raises, whose `exit_code` is 128 + signum.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self.signum = None
    self._signals = tuple(signals)
    self._previous = {}

  def install(self):
    if jax.process_count() > 1:
      if (signal.SIGINT in self._signals and _in_main_thread()
          and signal.getsignal(signal.SIGINT) not in (None, signal.SIG_IGN)):
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_as_sigterm)
      return self
    if not _in_main_thread():
      logging.warning('PreemptionFlag: signal handlers can only be set from the main thread; '
                      'SIGTERM will not trigger a final checkpoint.')
      return self
    for sig in self._signals:
      if signal.getsignal(sig) in (None, signal.SIG_IGN):
        # None: a handler set outside Python (e.g. jax.distributed's preemption notifier): it
        # cannot be restored once replaced, and the sync point in `check` already covers it.
        # SIG_IGN: the launcher chose to ignore it (a shell does so for SIGINT of `cmd &`).
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, the last checkpoint is kept
    # Only set a flag: the handler runs between bytecodes, possibly inside a save.
    self.requested = True
    self.signum = signum
    logging.warning('Received %s: will save a checkpoint and stop (at the end of this step).',
                    signal.Signals(signum).name)

  def _forward_as_sigterm(self, signum, frame):
    """Several processes: Ctrl-C becomes the SIGTERM jax's notifier turns into an agreed stop."""
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning('Received SIGINT: asking all processes to save a checkpoint and stop.')
    os.kill(os.getpid(), signal.SIGTERM)

  def check(self, step):
    """Returns True once the loop should save and stop; call it at every step on every process."""
    if (not self.requested and signal.SIGTERM not in self._previous
        and _reached_preemption_sync_point(step)):
      self.requested = True
      self.signum = self.signum or signal.SIGTERM
      logging.warning('Step %d: reached the preemption sync point; saving and stopping.', step)
    return self.requested

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum or signal.SIGTERM).name

  def error(self, message) -> Preempted:
    """The exception that ends the run: main exits with its `exit_code` (130 for SIGINT,
    143 for SIGTERM, as shells and schedulers expect of a job ended by that signal)."""
    e = Preempted(f'{self.signal_name}: {message}')
    e.exit_code = 128 + int(self.signum or signal.SIGTERM)
    return e

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()


def _in_main_thread():
  return threading.current_thread() is threading.main_thread()


def remove_partial_steps(directory, quiet_s=0.0, limit_s=10.0):
  """Removes the temporary directories of unfinished saves (never a complete step).

  With `quiet_s`, keeps removing until none has been seen for that long (at most `limit_s`):
  after a failed save, Orbax's other writers of the step (TensorStore's threads) may still be
  creating files in it, re-making a directory just removed or making rmtree give up on it."""
  deadline = time.monotonic() + limit_s
  last_seen = time.monotonic()
  while True:
    names = [n for n in (os.listdir(directory) if os.path.isdir(directory) else ())
             if TMP_MARKER in n]
    for name in names:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    now = time.monotonic()
    if names:
      last_seen = now
    if now - last_seen >= quiet_s or now > deadline:
      return
    time.sleep(0.05)


def _bytes_under(directory) -> int:
  total = 0
  for root, _, names in os.walk(directory):
    for name in names:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(root, name)).st_size
  return total


def _short_reason(e: BaseException) -> str:
  """The reason a step does not restore, in a few words: the type and the start of the first
  line, without the TensorStore spec (JSON, often dozens of lines) that many messages carry."""
  first = (str(e).strip().splitlines() or [''])[0]
  first = re.sub(r'Error opening "\w+" driver: ', '', first)  # what was read says enough
  for cut in (' {', '{"', ' in OCDBT database', ' at local file'):
    first = first.split(cut)[0]
  first = first.rstrip(' :;,')
  if len(first) > 120:
    first = first[:117] + '...'
  return f'{type(e).__name__}: {first}' if first else type(e).__name__


def _hide_closed_loop_noise():
  """Drops the tracebacks a failed Orbax read or write leaves behind; other unraisables and
  asyncio errors print as before. They say nothing the one line we print does not:
    * TensorStore callbacks into Orbax's closed asyncio loop each print a 'RuntimeError: Event
      loop is closed' traceback (unraisable exceptions);
    * Orbax's abandoned tasks keep their error unretrieved, and asyncio logs it with a traceback
      ('Task exception was never retrieved') when the task is collected;
    * abandoned write coroutines collected while Python shuts down fail to import in their
      cleanup ('Python is likely shutting down')."""
  previous = sys.unraisablehook
  if getattr(previous, '_blockprune_filter', False):
    return

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc):
      return
    if isinstance(exc, ImportError) and 'Python is likely shutting down' in str(exc):
      return
    previous(unraisable)
  hook._blockprune_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
  std_logging.getLogger('asyncio').addFilter(_UnretrievedTaskFilter())


class _UnretrievedTaskFilter(std_logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' records (see _hide_closed_loop_noise)."""

  def filter(self, record):
    return 'exception was never retrieved' not in record.getMessage()


def _reached_preemption_sync_point(step):
  """jax's multi-host preemption agreement, False where it does not exist (no jax.distributed,
  preemption service disabled, or the API moved)."""
  try:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))
  except (ImportError, AttributeError, RuntimeError):
    return False


class _OrbaxInfoFilter(std_logging.Filter):
  """Drops Orbax's per-save INFO lines (dozens per checkpoint), its warning that a step was
  saved without a metric (expected: only evaluation steps carry one), its tracebacks of a write
  that ran out of space (NoSpace says it in one line) and, while `muted`, everything (a restore
  attempt: its failure is our one warning line). Other warnings pass."""

  muted = 0  # how many restore attempts are running (threads may overlap)

  def filter(self, record):
    if 'orbax' not in record.pathname.replace(os.sep, '/').split('/'):
      return True
    if self.muted or record.levelno < std_logging.WARNING:
      return False
    message = record.getMessage()
    no_space = (files.no_space_reason(record.exc_info[1] if record.exc_info else None)
                or files.no_space_reason(Exception(message)))
    return not no_space and 'did not provide metrics' not in message


def _orbax_filter() -> _OrbaxInfoFilter:
  absl_logger = std_logging.getLogger('absl')  # Orbax logs through absl.logging
  for f in absl_logger.filters:
    if isinstance(f, _OrbaxInfoFilter):
      return f
  f = _OrbaxInfoFilter()
  absl_logger.addFilter(f)
  return f


def _quiet_orbax_logging():
  _orbax_filter()
  _hide_closed_loop_noise()


@contextlib.contextmanager
def _orbax_muted():
  """Orbax logs nothing in the body (see _OrbaxInfoFilter)."""
  f = _orbax_filter()
  f.muted += 1
  try:
    yield
  finally:
    f.muted -= 1
