"""Checkpoints of the whole training state with Orbax: a run killed at any moment restarts
from its latest checkpoint and continues exactly (Orbax renames a step into place only once every
process has written it, and deletes old steps only after a new one is committed).

Damage after the write is ours to catch: each step lists its files with their CRC32s
(FILE_LIST), checked before Orbax opens any (a damaged file Orbax reads leaves abandoned reads
that print tracebacks long after). A newest step that fails is moved aside to
`<directory>.unreadable/<step>-<time>` with one warning line, and the next newest is tried.
"""

import contextlib
import gc
import glob
import json
import math
import os
import shutil
import time
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_decision_lib

from blockprune_jax import files
from blockprune_jax import parallel
from blockprune_jax import quiet
from blockprune_jax.errors import UserError, one_line

METRIC = 'perplexity'  # the best-keeping metric's name in Orbax (lower is better)
# Orbax writes it last: a step without it is an interrupted copy, never restored.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
FILE_LIST = 'files.json'  # {path: [size, crc32]} of a step's files
CHECKSUM = 'checksum'  # state_checksum(state), in the meta of steps saved before file lists
META_FILE = os.path.join('meta', 'metadata')  # where Orbax's JsonSave puts the meta dict
TMP_MARKER = '.orbax-checkpoint-tmp'


class Checkpointer(contextlib.AbstractContextManager):
  """Saves the training state every `every_steps` steps; keeps the last `keep` plus the best.
  Every process calls every method (Orbax coordinates multi-host writes itself)."""

  def __init__(self, directory, keep=2, every_steps=500, keep_best=True):
    quiet.orbax()
    best_fn = lambda metrics: metrics[METRIC]
    # `max_to_keep` with `best_fn` keeps the N *best* steps, which could delete the latest one:
    # "the last N plus the best" is the union of two preservation policies.
    keep_policies = [preservation_lib.LatestN(n=keep)]
    if keep_best:
      keep_policies.append(preservation_lib.BestN(
          get_metric_fn=best_fn, reverse=True, n=1,  # reverse: lower perplexity is better
          keep_checkpoints_without_metrics=False))  # LatestN already guards those
    options = ocp.CheckpointManagerOptions(
        # Orbax's default policy would also save the very first step of a fresh run.
        save_decision_policy=save_decision_lib.AnySavePolicy([
            save_decision_lib.FixedIntervalPolicy(every_steps),
            save_decision_lib.PreemptionCheckpointingPolicy(),  # jax's multi-host sync point
        ]),
        preservation_policy=preservation_lib.AnyPreservationPolicy(keep_policies),
        # Makes Orbax store each step's metric, so a resumed run still knows the best step.
        best_fn=best_fn if keep_best else None,
        best_mode='min',
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._list_files),
    )
    self.directory = os.fspath(directory)
    self._root = os.path.abspath(self.directory)
    self.keep = keep
    self.keep_best = keep_best
    self._writing_step = None  # the step whose write has not been confirmed yet
    self._failed = False  # a write ran out of space (reported once; close() stays quiet)
    with quiet.orbax_muted():  # a damaged step is our one warning line when restored
      self._manager = ocp.CheckpointManager(self._root, options=options,
                                            item_names=('state', 'meta'))
    # Set aside (with the one warning line) by the next restore.
    self._incomplete = {step for step in self._manager.all_steps() if not os.path.exists(
        os.path.join(self._root, str(step), STEP_METADATA_FILE))}

  def latest_step(self):
    return max(self.all_steps(), default=None)

  def all_steps(self):
    return sorted(set(self._manager.all_steps()) - self._incomplete)

  def best_step(self):
    return self._manager.best_step() if self.keep_best else None

  def restore(self, target_state, step=None):
    """(state, meta) of `step` in the structure, dtypes and shardings of `target_state`. Without
    `step`, the newest that restores: the others are moved aside (one warning line each)."""
    self.wait()  # a step this process is still writing is not readable yet
    if step is not None:
      state, meta, error = self._try_restore(target_state, step)
      if error:
        raise UserError(f'checkpoint step {step} in {self.directory} does not restore ({error})')
      return state, meta
    for step in sorted(self._incomplete, reverse=True):
      # Older than every complete step: Orbax was deleting it (keep) when the run was killed.
      self._set_aside(step, f'no {STEP_METADATA_FILE}: its save or copy did not finish',
                      quietly=step < min(self.all_steps(), default=-1))
    if self.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint to restore in {self.directory}')
    while (step := self.latest_step()) is not None:
      state, meta, error = self._try_restore(target_state, step)
      if parallel.all_ok(not error):
        return state, meta
      self._set_aside(step, error or 'unreadable on another process')
    raise UserError(f'no checkpoint in {self.directory} restores (each was moved to '
                    f'{self.directory}.unreadable): run the same command again to start over')

  def latest_meta(self) -> dict | None:
    """The newest step's meta dict; None without a step or when it does not read."""
    if self.latest_step() is None:
      return None
    try:
      meta = files.load_json(os.path.join(self._root, str(self.latest_step()), META_FILE))
    except ValueError:
      return None
    return None if meta is None else _own_keys_removed(meta)

  def _try_restore(self, target_state, step):
    """(state, meta, None) if `step`'s files are as saved and it restores, else (.., reason)."""
    if error := _changed_file(os.path.join(self._root, str(step))):
      return None, None, error
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    try:
      with quiet.orbax_muted():
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      state, meta = restored['state'], dict(restored['meta'] or {})
      if CHECKSUM in meta and list(meta[CHECKSUM]) != state_checksum(state):
        return None, None, 'its checksum does not match: a file changed after it was written'
    except Exception as e:  # pylint: disable=broad-except  (Orbax raises many types)
      return None, None, _short_reason(e)
    finally:
      gc.collect()  # a failed attempt's leftovers go now, while Orbax is muted
    logging.info('Restored checkpoint step %d from %s', step, self.directory)
    return state, _own_keys_removed(meta), None

  def _set_aside(self, step, reason, quietly=False):
    aside = os.path.join(self._root + '.unreadable', f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.rename(os.path.join(self._root, str(step)), aside)
    parallel.sync(f'checkpoint step {step} set aside')
    self._incomplete.discard(step)
    self._manager.reload()
    if not quietly:
      logging.warning('Checkpoint step %d in %s does not restore (%s); moved it to %s and '
                      'falling back to the previous step.', step, self.directory, reason, aside)

  def _list_files(self):
    """Writes FILE_LIST (Orbax calls this on process 0 before it renames the step into place)."""
    tmp = sorted(glob.glob(os.path.join(self._root, f'{self._writing_step}{TMP_MARKER}*')),
                 key=os.path.getmtime)
    root = tmp[-1] if tmp else os.path.join(self._root, str(self._writing_step))
    paths = [os.path.join(where, name) for where, _, names in os.walk(root) for name in names]
    # Orbax rewrites its step metadata after this (it must stay JSON, that is all).
    listed = {os.path.relpath(p, root): None if os.path.basename(p) == STEP_METADATA_FILE
              else [os.path.getsize(p), _crc32(p)] for p in paths}
    with open(os.path.join(root, FILE_LIST), 'w') as f:
      json.dump(listed, f)

  def check_free_space(self, state):
    """Warns (one line) when the disk cannot hold `keep` + 1 states (the newest is written before
    the oldest goes; steps saved here count as free). Returns (needed, free) in bytes."""
    per_state = sum(int(x.nbytes) if hasattr(x, 'nbytes') else np.asarray(x).nbytes
                    for x in jax.tree.leaves(state))
    if self.latest_step() is not None:
      per_state = max(per_state, _bytes_under(os.path.join(self._root, str(self.latest_step()))))
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
    """Starts saving `state` and the JSON-able `meta` on a save step or with `force`, unless
    the step is saved already or the parameters hold NaN/Inf; returns whether it did. `metric`
    ranks the step for best-keeping. `state` may be donated to the next step at once."""
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    if step in self._manager.all_steps():  # e.g. a forced save right after an interval save
      return False
    if not params_are_finite(state):
      logging.error('Step %d: parameters hold NaN or Inf; not saving (the last good checkpoint '
                    'is kept).', step)
      return False
    ranked = self.keep_best and metric is not None and math.isfinite(float(metric))
    metrics = {METRIC: float(metric)} if ranked else None
    with self._writes():
      self._manager.wait_until_finished()  # an earlier step's failed write shows here
      self._writing_step = step
      return self._manager.save(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}))),
          metrics=metrics, force=True)

  def wait(self):
    with self._writes():
      self._manager.wait_until_finished()

  def close(self):
    if not self._failed:
      with self._writes():
        self._manager.close()
      return
    with contextlib.suppress(Exception):  # Orbax would raise the reported failure again
      self._manager.close()
    if jax.process_index() == 0:
      remove_partial_steps(self.directory, quiet_s=1.0)  # what late writers left

  def _writes(self):
    """A full disk while Orbax writes (seen at a later call): one NoSpace line, after the
    partial step is removed."""
    return files.writing(lambda: f'checkpoint step {self._writing_step}', self.directory,
                         cleanup=self._after_failed_write)

  def _after_failed_write(self):
    self._failed = True
    # Orbax's other writers of the step may still run: once stopped, they recreate nothing.
    with contextlib.suppress(Exception):
      self._manager.wait_until_finished()
    gc.collect()  # Orbax's abandoned write coroutines close now, not noisily at exit
    if jax.process_index() == 0:
      remove_partial_steps(self.directory)

  def __exit__(self, *exc):
    self.close()


def _own_keys_removed(meta):  # FILE_LIST: a marker some steps with a list carry
  return {k: v for k, v in meta.items() if k not in (CHECKSUM, FILE_LIST)}


def _crc32(path):
  crc = 0
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def _changed_file(root):
  """Why the step in `root` is not as saved (a file missing, changed or unreadable), or None.
  A step without FILE_LIST is one saved before lists existed only if its meta holds CHECKSUM
  (then left to Orbax and that)."""
  name = FILE_LIST
  try:
    listed = files.load_json(os.path.join(root, FILE_LIST))
    if listed is None:
      name = META_FILE
      meta = files.load_json(os.path.join(root, META_FILE))
      return None if meta is not None and CHECKSUM in meta else f'{FILE_LIST} is missing'
    for name, expected in sorted(listed.items()):
      path = os.path.join(root, name)
      if not os.path.isfile(path):
        return f'{name} is missing'
      if expected is None:
        files.load_json(path)
      elif [os.path.getsize(path), _crc32(path)] != expected:
        return f'its checksum does not match: {name} changed after it was written'
  except (ValueError, TypeError, OSError) as e:
    return f"{name} is unreadable ({_short_reason(e).removeprefix('ValueError: ')})"
  return None


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


@jax.jit
def _checksums(tree):
  """Per leaf, the sum of its bits * odd position weights mod 2**32: the same in any reduction
  order (any device count), and any single changed bit changes it."""
  sums = [jnp.zeros(0, jnp.uint32)]
  for x in jax.tree.leaves(tree):
    x = jnp.ravel(jnp.asarray(x))
    if x.dtype == jnp.bool_:
      bits = x.astype(jnp.uint32)
    else:
      width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
      bits = jnp.ravel(jax.lax.bitcast_convert_type(x, width)).astype(jnp.uint32)
    weights = (jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761)) | jnp.uint32(1)
    sums.append(jnp.sum(bits * weights, dtype=jnp.uint32, keepdims=True))
  return jnp.concatenate(sums)


def _host(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def state_checksum(state) -> list:
  """[uint32 per leaf] of `state`, computed where it lives (leaves on different devices, as Orbax
  restores them, via the host)."""
  try:
    out = _checksums(state)
  except ValueError:  # jit refuses arguments committed to different devices
    out = _checksums(jax.tree.map(_host, state))
  if hasattr(out, 'addressable_data'):  # replicated over processes: read the local copy
    out = out.addressable_data(0)
  return [int(v) for v in np.asarray(out)]


def params_are_finite(state):
  """Whether every float leaf of `state['params']` (or `state`) is finite; other state may hold
  legitimate infinities (a "best so far" initialised to inf)."""
  params = state['params'] if isinstance(state, dict) and 'params' in state else state
  return bool(_all_finite(params))


def remove_partial_steps(directory, quiet_s=0.0):
  """Removes the temporary directories of unfinished saves; with `quiet_s`, until none has been
  seen for that long (at most 10 s): after a failed save Orbax's other writers may re-make one."""
  deadline = time.monotonic() + 10
  last_seen = time.monotonic()
  while True:
    partial = glob.glob(os.path.join(glob.escape(os.fspath(directory)), f'*{TMP_MARKER}*'))
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
    if partial:
      last_seen = time.monotonic()
    if time.monotonic() - last_seen >= quiet_s or time.monotonic() > deadline:
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
  """An error in a few words: its type and first line, without TensorStore's spec."""
  return one_line(e, 120).split(' {')[0].split('{"')[0].rstrip(' :;,')
