"""Faults injected for real: each ends in one clear line, and no work is lost.

Damaged checkpoints (truncated files after a SIGKILL, flipped bytes), two processes on one
workdir, Ctrl-C, unreadable results.json / sweep.json, a sweep run that fails, an export that
dies half-way or meets a different export, and damaged model directories. The runs that must
end like an uninterrupted one go through the command line (one CPU device) and are compared
bitwise with `straight`, the same command run once without faults.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from blockprune_jax import checkpoint
from blockprune_jax import files
from blockprune_jax import hf_io
from blockprune_jax import model as model_lib
from blockprune_jax import pipeline
from blockprune_jax import sweep
from blockprune_jax.errors import UserError
import cli
from conftest import REPO, TINY_CONFIG, subprocess_env, tiny_config

STEPS, EVERY = 40, 4  # checkpoints at 4, 8, ...; the last two are kept (checkpoint.keep=2)


def _cmd(workdir, steps=STEPS):
  """The faulted command: dropout on (so the resumed RNG matters), a checkpoint every 4 steps."""
  return cli.command(workdir, f"--config.train.steps={steps}",
                     f"--config.checkpoint.every_steps={EVERY}", "--config.export.hf=true",
                     "--config.model.dropout=0.1")


def _run(workdir, **kwargs):
  return cli.run(_cmd(workdir, **kwargs), timeout=300)


@pytest.fixture
def straight(uninterrupted):
  """The exported weights of the faulted command run once, uninterrupted (shared by the tests)."""
  workdir, _ = uninterrupted(_cmd)
  return cli.exported_params(workdir)


# --- checkpoints damaged after a kill --------------------------------------------------------

@pytest.mark.slow
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_ends_as_uninterrupted(
    tmp_path, straight):
  d, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
  proc = cli.start(_cmd(d), tmp_path / "killed.err")
  cli.wait_for(proc, lambda: (ckpts / str(2 * EVERY)).is_dir(), tmp_path / "killed.err")
  cli.stop(proc, timeout=60)  # SIGKILL: no chance to save anything more
  assert not (d / "results.json").exists(), "killed too late"
  steps = cli.checkpoint_steps(ckpts)
  assert len(steps) >= 2

  # Half-written: every file of the newest step cut in half.
  for f in (ckpts / str(steps[-1])).rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  r = _run(d)
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  warned = [l for l in r.stderr.splitlines() if "does not restore" in l]
  assert len(warned) == 1 and f"Checkpoint step {steps[-1]} " in warned[0], warned
  assert cli.events(d, "resume")[-1]["step"] == steps[-2]  # the newest step that restores
  cli.assert_same_params(cli.exported_params(d), straight)

  # Damaged: one flipped byte in each data file of the (new) newest step (OCDBT's CRC catches
  # some; a flip Orbax restores silently is caught by our checksum, see the test below).
  newest = cli.checkpoint_steps(ckpts)[-1]
  assert newest == STEPS
  for f in (ckpts / str(newest) / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      data = bytearray(f.read_bytes())
      data[len(data) // 2] ^= 0xFF
      f.write_bytes(bytes(data))
  (d / "results.json").unlink()  # as if killed right after its last checkpoint
  r = _run(d)
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  warned = [l for l in r.stderr.splitlines() if "does not restore" in l]
  assert len(warned) == 1 and f"Checkpoint step {STEPS} " in warned[0], warned
  assert cli.events(d, "resume")[-1]["step"] == STEPS - EVERY
  cli.assert_same_params(cli.exported_params(d), straight)
  # Nothing was deleted: both damaged steps are kept aside; the export was rewritten
  # identically, so no earlier export was moved away.
  assert len(os.listdir(tmp_path / "run" / "checkpoints.unreadable")) == 2
  assert not [p for p in os.listdir(d) if p.startswith("export.replaced")]


def _damage_file(path, kind):
  data = path.read_bytes()
  if kind == "delete":
    path.unlink()
  else:
    path.write_bytes(data[:len(data) // 2] if kind == "half" else bytes(len(data)))


def _killed_after_last_checkpoint(reference, d):
  """A copy of the finished reference workdir without results.json: as if killed right after
  its last checkpoint."""
  shutil.copytree(reference, d)
  (d / "results.json").unlink()
  return d / "checkpoints"


def _warnings(stderr):
  return [l for l in stderr.splitlines() if "does not restore" in l]


@pytest.mark.slow
def test_damage_to_any_file_of_the_newest_step_is_one_line_and_a_bitwise_resume(
    tmp_path, uninterrupted):
  """Issue 29's fuzz: every file of the newest step x {half, zeros, delete}, one rerun each."""
  reference, _ = uninterrupted(_cmd)
  straight = cli.exported_params(reference)
  newest = reference / "checkpoints" / str(STEPS)
  names = sorted(str(f.relative_to(newest)) for f in newest.rglob("*") if f.is_file())
  table = []
  for i, name in enumerate(names):
    for kind in ("half", "zeros", "delete"):
      d = tmp_path / f"{i}-{kind}"
      ckpts = _killed_after_last_checkpoint(reference, d)
      _damage_file(ckpts / str(STEPS) / name, kind)
      r = _run(d)
      assert r.returncode == 0, r.stderr[-3000:]
      assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
      said = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[blockprune]")]
      resumed = cli.events(d, "resume")[-1]["step"]
      if name == "commit_success.txt":  # Orbax's GCS marker, written after the list: unread
        assert not said and resumed == STEPS, said
      else:
        assert len(said) == 1 and f"Checkpoint step {STEPS} " in said[0], said
        assert "does not restore" in said[0] and resumed == STEPS - EVERY, said
      cli.assert_same_params(cli.exported_params(d), straight, f"{name} {kind}: ")
      table.append(f"{name} {kind}: {len(said)} line, resumed from {resumed}")
      shutil.rmtree(d)
  print("\n".join(table))


@pytest.mark.slow
def test_two_damaged_steps_fall_back_two_and_all_damaged_starts_over(tmp_path, uninterrupted):
  command = lambda workdir: _cmd(workdir) + ["--config.checkpoint.keep=3"]
  reference, _ = uninterrupted(command)
  straight = cli.exported_params(reference)
  d = tmp_path / "two"
  ckpts = _killed_after_last_checkpoint(reference, d)
  steps = cli.checkpoint_steps(ckpts)
  assert steps[-3:] == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS], steps
  for step in steps[-2:]:
    step_files = [f for f in (ckpts / str(step)).rglob("*") if f.is_file()]
    _damage_file(max(step_files, key=lambda f: f.stat().st_size), "half")
  r = cli.run(command(d), timeout=300)
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  warned = _warnings(r.stderr)
  assert len(warned) == 2 and f"Checkpoint step {STEPS} " in warned[0], warned
  assert f"Checkpoint step {STEPS - EVERY} " in warned[1], warned
  assert cli.events(d, "resume")[-1]["step"] == STEPS - 2 * EVERY
  cli.assert_same_params(cli.exported_params(d), straight)

  # Every step damaged: one line each, then a refusal that says how to start over; the
  # export is not touched. The same command then starts over and ends as uninterrupted.
  d = tmp_path / "all"
  ckpts = _killed_after_last_checkpoint(reference, d)
  export = {f.name: f.read_bytes() for f in (d / "export").iterdir()}
  for step in cli.checkpoint_steps(ckpts):
    _damage_file(ckpts / str(step) / checkpoint.FILE_LIST, "zeros")
  r = cli.run(command(d), timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  said = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[blockprune]")]
  assert len(said) == len(steps) + 1 and said[:-1] == _warnings(r.stderr), said
  assert said[-1] == (f"error: no checkpoint in {ckpts} restores (each was moved to "
                      f"{ckpts}.unreadable): run the same command again to start over"), said
  assert {f.name: f.read_bytes() for f in (d / "export").iterdir()} == export
  r = cli.run(command(d), timeout=300)
  assert r.returncode == 0 and not _warnings(r.stderr), r.stderr[-3000:]
  cli.assert_same_params(cli.exported_params(d), straight)


def _state(seed):
  rng = np.random.RandomState(seed)
  return {"params": {"w": rng.randn(64, 64).astype(np.float32),
                     "b": rng.randn(64).astype(np.float32)}, "step": np.array(seed, np.int32)}


def _orbax_restore(directory, step, target):
  """Orbax alone, without our checksum: what a flipped byte turns into (or its error)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "meta")) as m:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))["state"]


# Orbax's failed restores (the CRC cases the loop skips) leave TensorStore callbacks into a closed
# asyncio loop; our Checkpointer hides that noise, the raw Orbax calls here do not.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_flip_orbax_restores_silently_is_caught_by_the_checksum(tmp_path, caplog):
  import shutil  # pylint: disable=import-outside-toplevel
  src = tmp_path / "src"
  with checkpoint.Checkpointer(src, keep=2, every_steps=1) as ckpt:
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
  data_files = sorted(f.relative_to(src) for f in (src / "2" / "state").rglob("*")
                      if f.is_file() and f.parent.name == "d")
  for i, rel in enumerate(data_files):
    d = tmp_path / f"flip{i}"
    shutil.copytree(src, d)
    data = bytearray((d / rel).read_bytes())
    data[len(data) // 2] ^= 0x10
    (d / rel).write_bytes(bytes(data))
    try:
      raw = _orbax_restore(d, 2, _state(0))
    except Exception:  # pylint: disable=broad-except
      continue  # detected by TensorStore itself (a CRC, a short read): not the silent case
    if all(np.array_equal(a, b) for a, b in zip(_leaves(raw), _leaves(_state(2)))):
      continue  # the byte was not one of the arrays' values
    # Orbax returned wrong numbers without a word; our restore refuses them and falls back.
    with checkpoint.Checkpointer(d, keep=2, every_steps=1) as ckpt:
      state, _ = ckpt.restore(_state(0))
      assert ckpt.latest_step() == 1
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(state), _leaves(_state(1))))
    assert any("checksum does not match" in r.getMessage() for r in caplog.records)
    return
  pytest.fail(f"no silent flip found among {len(data_files)} data files")


def _leaves(tree):
  import jax  # pylint: disable=import-outside-toplevel
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_checksum_catches_a_changed_array(tmp_path):
  state = {"params": {"w": np.arange(6, dtype=np.float32)}, "step": np.int32(3)}
  same = {"params": {"w": np.arange(6, dtype=np.float32)}, "step": np.int32(3)}
  assert checkpoint.state_checksum(state) == checkpoint.state_checksum(same)
  bits = state["params"]["w"].view(np.uint32)
  for i in range(6):
    for b in (0, 17, 31):  # any single bit, anywhere
      changed = bits.copy()
      changed[i] ^= np.uint32(1 << b)
      other = {"params": {"w": changed.view(np.float32)}, "step": np.int32(3)}
      assert checkpoint.state_checksum(other) != checkpoint.state_checksum(state)
  del tmp_path


# --- a full disk --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_keeps_the_checkpoints_and_resumes_as_uninterrupted(
    small_disk, straight):
  # 1200 KiB hold the logs and two of the tiny model's checkpoints (about 550 KiB each), not a
  # third: the third save runs out of space for real.
  disk = small_disk(1200)
  d, ckpts = disk / "run", disk / "run" / "checkpoints"
  r = _run(d)
  assert r.returncode == 28, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr[-3000:]
  said = [l for l in r.stderr.strip().splitlines() if not l.startswith("[blockprune] ")]
  assert len(said) == 2, said  # the warning before training, the error at the end
  assert "free for checkpoints in" in said[0] and "checkpoint.keep=2 + 1 saved states" in said[0]
  error = said[1]
  assert error.startswith("error: No space left on device writing checkpoint step "), error
  assert f" to {ckpts} (" in error and " free); free space and run the same command again" in error
  kept = cli.checkpoint_steps(ckpts)
  assert len(kept) == 2 and sorted(os.listdir(ckpts)) == sorted(map(str, kept))  # no tmp dir
  assert not (d / "results.json").exists()

  small_disk.resize(disk, 16 * 1024)  # space freed: the same command resumes from the newest
  r = _run(d)
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert cli.events(d, "resume")[-1]["step"] == kept[-1]
  cli.assert_same_params(cli.exported_params(d), straight)


def test_partial_steps_a_late_writer_keeps_making_are_removed_until_it_stops(tmp_path):
  # After a failed save Orbax's other writers of the step may go on creating its files for a
  # while (seen once in CI: the tmp directory was back after the run ended).
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  (tmp_path / "4").mkdir()
  tmp = tmp_path / ("12" + checkpoint.TMP_MARKER)

  def late_writer():
    for i in range(6):
      (tmp / "state" / str(i)).mkdir(parents=True, exist_ok=True)
      time.sleep(0.05)

  writer = threading.Thread(target=late_writer)
  writer.start()
  checkpoint.remove_partial_steps(tmp_path, quiet_s=0.5)
  writer.join()
  assert sorted(os.listdir(tmp_path)) == ["4"]


# --- Ctrl-C ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_saves_exits_130_in_one_line_and_resumes_to_the_same_weights(tmp_path, straight):
  d, err = tmp_path / "run", tmp_path / "sigint.err"
  proc = cli.start(_cmd(d), err)
  cli.wait_for(proc, lambda: cli.last_step_logged(d) >= 6, err)
  assert cli.stop(proc, signal.SIGINT) == 130
  text = open(err).read()
  assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
  last = text.strip().splitlines()[-1]
  assert last.startswith("interrupted: SIGINT: checkpoint saved at step "), last
  saved = int(last.split("step ")[1].split()[0])
  assert saved >= 6 and checkpoint.Checkpointer(d / "checkpoints").latest_step() == saved
  assert not (d / "results.json").exists()
  r = _run(d)
  assert r.returncode == 0, r.stderr[-3000:]
  assert cli.events(d, "resume")[-1]["step"] == saved
  cli.assert_same_params(cli.exported_params(d), straight)


# --- two processes, one workdir ----------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_goes_on(tmp_path):
  d, err = tmp_path / "run", tmp_path / "first.err"
  first = cli.start(_cmd(d, steps=100000), err)
  cli.wait_for(first, lambda: cli.last_step_logged(d) >= 1, err)
  second = _run(d, steps=100000)
  assert second.returncode == 2
  lines = second.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: {d} is in use by another run (pid {first.pid} on "), lines
  # The first is unharmed: still training, alone in its log, and it stops cleanly.
  step = cli.last_step_logged(d)
  cli.wait_for(first, lambda: cli.last_step_logged(d) > step, err)
  assert cli.stop(first, signal.SIGTERM) == 143
  assert len(cli.events(d, "start")) == 1
  assert checkpoint.Checkpointer(d / "checkpoints").latest_step() > step


def test_a_killed_lock_holder_leaves_no_stale_lock(tmp_path):
  d = str(tmp_path / "w")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom blockprune_jax import files\n"
       "lock = files.workdir_lock(sys.argv[1])\nlock.__enter__()\nprint('locked', flush=True)\n"
       "time.sleep(600)",
       d], env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(UserError, match=f"in use by another run \\(pid {holder.pid} on "):
    with files.workdir_lock(d):
      pass
  holder.kill()
  holder.wait(timeout=30)
  with files.workdir_lock(d):  # the kernel dropped the dead holder's lock
    pass


# --- unreadable results.json / sweep.json ----------------------------------------------------

def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  return data[:len(data) // 2]


@pytest.mark.slow
def test_unreadable_results_json_is_set_aside_and_the_run_goes_again(tmp_path):
  d = tmp_path / "run"
  config = tiny_config(train__steps=3, export__hf=True)
  first = pipeline.run(config, str(d))
  cut = _truncate(d / "results.json")
  again = pipeline.run(config, str(d))  # one warning line, then a clean rerun
  assert again["perplexity"] == first["perplexity"]
  assert again["train"]["steps"] == 3
  aside = [p for p in os.listdir(d) if p.startswith("results.json.unreadable-")]
  assert len(aside) == 1 and (d / aside[0]).read_bytes() == cut  # kept, not deleted
  assert json.load(open(d / "results.json")) == again
  assert not [p for p in os.listdir(d) if p.startswith("export.replaced")]


@pytest.mark.slow
def test_a_sweep_with_unreadable_sweep_json_and_results_json_goes_on(tmp_path):
  d = tmp_path / "sweep"
  runs = [{"seed": 0}, {"seed": 1}]
  rows = sweep.run_sweep(tiny_config(), str(d), runs, report=False)
  assert [r["status"] for r in rows] == ["done", "done"]
  _truncate(d / "sweep.json")
  _truncate(d / "seed=1" / "results.json")
  rows = sweep.run_sweep(tiny_config(), str(d), runs, report=False)
  assert [(r["status"], r.get("reused", False)) for r in rows] == [("done", True),
                                                                   ("done", False)]
  state = json.load(open(d / "sweep.json"))
  assert state["counts"]["done"] == 2
  assert json.load(open(d / "seed=1" / "results.json"))["config"]["seed"] == 1


@pytest.mark.slow
def test_a_sweep_names_its_failed_run_and_why_and_finishes_the_others(tmp_path):
  tests_dir = os.path.dirname(TINY_CONFIG)
  config = tmp_path / "two_runs.py"
  bad = {"train.steps": 4, "train.learning_rate": 1e30, "train.grad_clip": 0.0,
         "train.warmup_steps": 1}
  config.write_text(
      f"import sys\nsys.path.insert(0, {tests_dir!r})\nfrom tiny import get_config\n\n"
      f"def get_sweep(arg=None):\n  return [{{'train.steps': 4}}, {bad!r}]\n")
  r = cli.run(cli.command(tmp_path / "sweep", config=config), timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  good_name, bad_name = sweep.run_name({"train.steps": 4}), sweep.run_name(bad)
  lines = r.stderr.strip().splitlines()
  assert lines[-1] == f"error: 1 of 2 runs failed (see sweep.json): {bad_name}"
  assert lines[-2].startswith(f"failed: {bad_name}: Diverged: non-finite loss at step "), lines[-2]
  assert (tmp_path / "sweep" / good_name / "results.json").exists()
  assert (tmp_path / "sweep" / "report.md").exists()


# --- exports ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_is_atomic_and_never_overwrites_a_different_export(tmp_path, monkeypatch):
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  cfg = model_lib.GPT2Config(vocab_size=257, n_layer=2, n_embd=32, n_head=2, n_positions=64)
  out = tmp_path / "export"
  hf_io.export(model_lib.init_params(cfg, 0), cfg, str(out))
  before = {p: (out / p).read_bytes() for p in os.listdir(out)}
  hf_io.export(model_lib.init_params(cfg, 0), cfg, str(out))  # the same export again: kept
  assert sorted(os.listdir(tmp_path)) == ["export"]

  def dies(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(safetensors.numpy, "save_file", dies)
  with pytest.raises(OSError, match="disk full"):
    hf_io.export(model_lib.init_params(cfg, 1), cfg, str(out))
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no half export, no temporary left
  assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
  monkeypatch.undo()

  hf_io.export(model_lib.init_params(cfg, 1), cfg, str(out))  # a different model
  aside = [p for p in os.listdir(tmp_path) if p.startswith("export.replaced-")]
  assert len(aside) == 1
  assert {p: (tmp_path / aside[0] / p).read_bytes() for p in before} == before
  assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


# --- damaged inputs ----------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path):
  cfg = model_lib.GPT2Config(vocab_size=257, n_layer=2, n_embd=32, n_head=2, n_positions=64)
  return hf_io.export(model_lib.init_params(cfg, 0), cfg, str(tmp_path / "model"))


def _damage(model_dir, how):
  st, cfg = os.path.join(model_dir, "model.safetensors"), os.path.join(model_dir, "config.json")
  if how == "truncated model.safetensors":
    _truncate(st)
  elif how == "truncated config.json":
    _truncate(cfg)
  elif how == "config.json without n_embd":
    c = json.load(open(cfg))
    del c["n_embd"]
    json.dump(c, open(cfg, "w"))
  elif how == "truncated tokenizer.json":
    open(os.path.join(model_dir, "tokenizer.json"), "w").write('{"version": "1.0", "mod')
  elif how == "damaged pytorch_model.bin":
    os.remove(st)
    open(os.path.join(model_dir, "pytorch_model.bin"), "wb").write(b"PK\x03\x04 not a zip")
  elif how == "index naming a missing shard":
    os.rename(st, os.path.join(model_dir, "model-00001-of-00002.safetensors"))
    json.dump({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors",
                              "transformer.wpe.weight": "model-00002-of-00002.safetensors"}},
              open(st + ".index.json", "w"))


@pytest.mark.parametrize("how,names", [
    ("truncated model.safetensors", "model.safetensors is unreadable"),
    ("truncated config.json", "config.json is unreadable"),
    ("config.json without n_embd", "config.json: n_embd is missing"),
    ("truncated tokenizer.json", "tokenizer.json is unreadable"),
    ("damaged pytorch_model.bin", "pytorch_model.bin is unreadable"),
    ("index naming a missing shard", "model-00002-of-00002.safetensors"),
])
def test_a_damaged_model_directory_is_one_line_naming_the_file(model_dir, tmp_path, how, names):
  _damage(model_dir, how)
  config = tiny_config(model__init="pretrained", model__name_or_path=model_dir)
  with pytest.raises(UserError) as e:
    pipeline.run(config, str(tmp_path / "w"))
  assert names in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_a_truncated_model_file_from_the_command_line(model_dir, tmp_path):
  _damage(model_dir, "truncated model.safetensors")
  r = cli.run(cli.command(tmp_path / "w", "--config.model.init=pretrained",
                         f"--config.model.name_or_path={model_dir}"), timeout=120)
  assert r.returncode == 2
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {model_dir}/model.safetensors is unreadable ("), last
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("entry,kind", [("", "file"), ("results.json", "directory"),
                                        ("export", "file"), ("checkpoints", "file")])
def test_a_wrong_kind_of_path_is_refused_before_any_work(tmp_path, entry, kind):
  workdir = tmp_path / "w"
  target = workdir / entry if entry else workdir
  target.parent.mkdir(parents=True, exist_ok=True)
  if kind == "directory":
    target.mkdir()
  else:
    target.write_text("not what the run expects")
  with pytest.raises(UserError) as e:
    pipeline.run(tiny_config(train__steps=2), str(workdir))
  assert str(target) in str(e.value) or repr(str(target)) in str(e.value), str(e.value)
  assert not (workdir / "log.jsonl").exists()


def test_a_save_cut_short_adds_nothing_under_the_one_line():
  """Orbax's async writes stopped by a full disk leave coroutines never awaited; Python would
  report them at exit (this test failed once that way under test_a_full_disk_ends...)."""
  script = ("from blockprune_jax import main\n"
            "async def write_fragment():\n  pass\n"
            "pending = write_fragment()\n"
            "main._exit(28, 'error: No space left on device')\n")
  r = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), cwd=REPO,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 28
  assert r.stderr.strip().splitlines() == ["error: No space left on device"]
