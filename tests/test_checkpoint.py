"""Checkpointer and PreemptionFlag: exact round trip, retention, atomicity, SIGTERM, NaN refusal."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blockprune_jax import checkpoint
from blockprune_jax import preemption


def make_state(seed=0):
  """A small training state shaped like the real one."""
  k = jax.random.split(jax.random.key(seed), 3)
  params = {
      'h_0': {'mlp': {'c_fc': {'kernel': jax.random.normal(k[0], (8, 16)),
                               'bias': jnp.zeros((16,))},
                      'c_proj': {'kernel': jax.random.normal(k[1], (16, 8)),
                                 'bias': jnp.zeros((8,))}}},
      'ln_f': {'scale': jnp.ones((8,)), 'bias': jnp.zeros((8,))},
  }
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  # One real update so mu, nu and count are not trivial.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
  _, opt_state = tx.update(grads, opt_state, params)
  masks = {'h_0': {'mlp': {'c_fc': {'kernel': jax.random.bernoulli(k[2], 0.5, (8, 16))}}}}
  return {
      'params': params,
      'opt_state': opt_state,
      'masks': masks,
      'step': jnp.int32(7),
      'data_position': 12345,  # a Python int comes back as one
      'rng': jax.random.key_data(jax.random.key(seed)),
  }


def zeros_like_state(state):
  return jax.tree.map(lambda x: jnp.zeros_like(x) if hasattr(x, 'dtype') else 0, state)


def assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert type(x) is type(y) or (hasattr(x, 'dtype') and hasattr(y, 'dtype'))
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()  # bitwise


def test_round_trip_is_bitwise(tmp_path):
  state = make_state()
  meta = {'best_validation_perplexity': 21.76, 'history': [{'step': 7, 'loss': 3.1}]}
  with checkpoint.Checkpointer(tmp_path / 'checkpoints', every_steps=5) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, meta)
    ckpt.wait()
  # A new Checkpointer, as after a restart.
  with checkpoint.Checkpointer(tmp_path / 'checkpoints', every_steps=5) as ckpt:
    assert ckpt.latest_step() == 10
    restored, restored_meta = ckpt.restore(zeros_like_state(state))
  assert_trees_identical(restored, state)
  assert restored_meta == meta
  assert isinstance(restored['opt_state'][0], optax.ScaleByAdamState)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(restored) if hasattr(x, 'dtype')}
  assert dtypes == {'float32', 'int32', 'uint32', 'bool'}
  assert restored['data_position'] == 12345 and isinstance(restored['data_position'], int)
  assert restored['rng'].shape == (2,)


def test_empty_masks_and_no_meta(tmp_path):
  state = make_state()
  state['masks'] = {}
  with checkpoint.Checkpointer(tmp_path, every_steps=1) as ckpt:
    assert ckpt.save(1, state)
    restored, meta = ckpt.restore(zeros_like_state(state))
  assert restored['masks'] == {} and meta == {}
  assert_trees_identical(restored, state)


def test_saves_only_on_interval_or_force(tmp_path):
  state = make_state()
  with checkpoint.Checkpointer(tmp_path, every_steps=10) as ckpt:
    assert not ckpt.save(1, state)  # not the first step of a fresh run either
    assert not ckpt.save(5, state)
    assert ckpt.save(10, state)
    assert ckpt.save(13, state, force=True)
    assert not ckpt.save(13, state, force=True)  # already saved: no error, no overwrite
    ckpt.wait()
    assert ckpt.all_steps() == [10, 13]


def test_keeps_last_n_plus_best(tmp_path):
  state = make_state()
  ppl = {10: 30.0, 20: 22.0, 30: 25.0, 40: None, 50: 27.0, 60: None}
  with checkpoint.Checkpointer(tmp_path, keep=2, every_steps=10) as ckpt:
    for step, metric in ppl.items():
      assert ckpt.save(step, state, metric=metric)
    ckpt.wait()
    assert ckpt.all_steps() == [20, 50, 60]
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [20, 50, 60]
  # The best is still known after a restart (Orbax stored its metric on disk).
  with checkpoint.Checkpointer(tmp_path, keep=2, every_steps=10) as ckpt:
    assert ckpt.best_step() == 20
    assert ckpt.save(70, state, metric=19.0)  # a new best: the old best may go
    assert ckpt.save(80, state, metric=float('nan'))  # a NaN metric never counts as best
    ckpt.wait()
    assert ckpt.all_steps() == [70, 80]


def test_keep_best_off_keeps_last_n(tmp_path):
  state = make_state()
  with checkpoint.Checkpointer(tmp_path, keep=2, every_steps=1, keep_best=False) as ckpt:
    for step, metric in [(1, 1.0), (2, 5.0), (3, 6.0)]:
      ckpt.save(step, state, metric=metric)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]


def test_restore_picks_latest_and_ignores_incomplete(tmp_path):
  directory = tmp_path / 'checkpoints'
  with checkpoint.Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    for step in (1, 2):
      ckpt.save(step, make_state(seed=step), {'step': step})
  # What a run killed mid-save leaves behind: Orbax's temporary directory for a newer step.
  (directory / '3.orbax-checkpoint-tmp-1700000000000000').mkdir()
  (directory / '3.orbax-checkpoint-tmp-1700000000000000' / 'partial').write_text('x')
  # And a step directory that never got Orbax's final metadata file (an interrupted copy).
  (directory / '4' / 'state').mkdir(parents=True)
  with checkpoint.Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    assert ckpt.latest_step() == 2
    state, meta = ckpt.restore(zeros_like_state(make_state()))
    assert meta == {'step': 2}
    assert_trees_identical(state, make_state(seed=2))
    older, _ = ckpt.restore(zeros_like_state(make_state()), step=1)
    assert_trees_identical(older, make_state(seed=1))
    assert ckpt.all_steps() == [1, 2]
    # The temporary directory is gone and its step can be written afresh.
    assert not (directory / '3.orbax-checkpoint-tmp-1700000000000000').exists()
    assert ckpt.save(3, make_state(seed=3), force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 3


def test_an_old_step_cut_short_while_being_deleted_is_set_aside_without_a_line(tmp_path, caplog):
  # A run killed while Orbax deleted its oldest step (checkpoint.keep) leaves that step without
  # its final metadata file: nothing to warn about, but nothing is removed either.
  directory = tmp_path / 'checkpoints'
  with checkpoint.Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make_state(seed=step), {'step': step})
  (directory / '1' / '_CHECKPOINT_METADATA').unlink()
  with checkpoint.Checkpointer(directory, keep=3, every_steps=1) as ckpt:
    _, meta = ckpt.restore(zeros_like_state(make_state()))
  assert meta == {'step': 3} and not (directory / '1').exists()
  assert len(os.listdir(tmp_path / 'checkpoints.unreadable')) == 1
  assert not [r for r in caplog.records if r.levelname == 'WARNING'], caplog.records


def test_a_step_saved_before_file_lists_restores_its_checksum_checked(tmp_path, caplog):
  """Such a step has no files.json; its meta holds the state's checksum instead."""
  with checkpoint.Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    for step in (1, 2):
      ckpt.save(step, make_state(seed=step), {'step': step})
  for step in (1, 2):
    os.remove(tmp_path / str(step) / checkpoint.FILE_LIST)
    meta_file = tmp_path / str(step) / checkpoint.META_FILE
    meta = dict(json.loads(meta_file.read_text()), step=step)
    meta[checkpoint.CHECKSUM] = checkpoint.state_checksum(make_state(seed=step))
    meta[checkpoint.CHECKSUM][0] ^= int(step == 2)  # step 2: as if an array changed silently
    meta_file.write_text(json.dumps(meta))
  with checkpoint.Checkpointer(tmp_path, keep=2, every_steps=1) as ckpt:
    state, meta = ckpt.restore(zeros_like_state(make_state()))
  assert meta == {'step': 1}
  assert_trees_identical(state, make_state(seed=1))
  assert any('checksum does not match' in r.getMessage() for r in caplog.records)


def test_restore_without_checkpoint_raises(tmp_path):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError):
      ckpt.restore(make_state())


def test_non_finite_params_are_not_saved(tmp_path):
  good = make_state()
  bad = make_state()
  bad['params']['ln_f']['scale'] = bad['params']['ln_f']['scale'].at[3].set(jnp.nan)
  with checkpoint.Checkpointer(tmp_path, keep=1, every_steps=1) as ckpt:
    assert ckpt.save(1, good)
    assert not ckpt.save(2, bad)
    assert not ckpt.save(3, bad, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [1]
  inf = make_state()
  inf['params']['h_0']['mlp']['c_fc']['kernel'] = inf['params']['h_0']['mlp']['c_fc'][
      'kernel'].at[0, 0].set(jnp.inf)
  assert not checkpoint.params_are_finite(inf)
  assert checkpoint.params_are_finite(good)


def test_sigterm_sets_flag_and_restores_handler():
  calls = []
  previous = lambda signum, frame: calls.append(signum)
  old = signal.signal(signal.SIGTERM, previous)
  try:
    with preemption.PreemptionFlag() as flag:
      assert not flag.requested and not flag.check(0)
      os.kill(os.getpid(), signal.SIGTERM)
      assert flag.requested and flag.check(1)
      assert calls == []  # the process was not killed and the old handler not called
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    signal.signal(signal.SIGTERM, old)
