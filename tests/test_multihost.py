"""Two JAX processes on this machine, as on two hosts: the same numbers, one writer, one stop.

Each process has two fake CPU devices and joins the other through jax.distributed (coordinator
on localhost; JAX_NUM_PROCESSES / JAX_PROCESS_ID, which parallel.maybe_initialize_distributed
passes on); collectives between them go over gloo, jax's CPU implementation. Every file a
process writes in the workdir is recorded by a Python audit hook (Orbax's checkpoints aside,
which it coordinates itself).
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from blockprune_jax import checkpoint
from blockprune_jax import pipeline
import cli
from conftest import REPO, TINY_CONFIG, subprocess_env, tiny_config

pytestmark = pytest.mark.slow  # two JAX processes per run

# Runs blockprune_jax.main with an audit hook that records, at exit, the paths it wrote (opened
# for writing, created, renamed, removed) inside the workdir, except under checkpoints/.
_LAUNCH = r"""
import atexit, os, runpy, sys
workdir, record = os.path.abspath(sys.argv[1]), sys.argv[2]
skip = os.path.join(workdir, "checkpoints")
written = set()

def note(path):
  if isinstance(path, int) or path is None:
    return
  path = os.path.abspath(os.fsdecode(path))
  if (path == workdir or path.startswith(workdir + os.sep)) and not path.startswith(skip):
    written.add(os.path.relpath(path, workdir))

def hook(event, args):
  if event == "open":
    path, mode, flags = args
    if (mode and any(c in mode for c in "wax+")) or (
        not mode and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
      note(path)
  elif event in ("os.rename", "os.replace"):
    note(args[0]); note(args[1])
  elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree"):
    note(args[0])

sys.addaudithook(hook)
atexit.register(lambda: open(record, "w").write("\n".join(sorted(written))))
sys.argv = ["blockprune_jax.main"] + sys.argv[3:]
runpy.run_module("blockprune_jax.main", run_name="__main__", alter_sys=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _two_processes(tmp_path, workdir, flags, tag, devices=2):
  """Starts process 0 and 1 of one job (`devices` each); yields them; kills any still running at
  the end."""
  port = _free_port()
  procs = []
  for i in range(2):
    env = subprocess_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                         JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                         JAX_PROCESS_ID=str(i))
    cmd = [sys.executable, "-c", _LAUNCH, str(workdir), str(tmp_path / f"{tag}{i}.written"),
           f"--config={TINY_CONFIG}", f"--workdir={workdir}", *flags]
    procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / f"{tag}{i}.err", "w")))
  try:
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _stderr(tmp_path, tag, i):
  return open(tmp_path / f"{tag}{i}.err").read()


def _written(tmp_path, tag, i):
  return set(filter(None, open(tmp_path / f"{tag}{i}.written").read().split("\n")))


def _wait(procs, tmp_path, tag, timeout=240):
  codes = []
  for i, p in enumerate(procs):
    try:
      codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      pytest.fail(f"process {i} hung:\n" + _stderr(tmp_path, tag, i)[-3000:])
  return codes


FINETUNE = ["--config.prune.method=magnitude", "--config.train.steps=4",
            "--config.checkpoint.every_steps=2", "--config.export.hf=true"]


def test_two_processes_match_one_and_only_process_0_writes(tmp_path):
  workdir = tmp_path / "two"
  with _two_processes(tmp_path, workdir, FINETUNE, "ft") as procs:
    codes = _wait(procs, tmp_path, "ft")
  assert codes == [0, 0], _stderr(tmp_path, "ft", 0)[-2000:] + _stderr(tmp_path, "ft", 1)[-2000:]
  two = json.load(open(workdir / "results.json"))
  assert two["runtime"]["processes"] == 2 and two["runtime"]["devices"] == 4

  # The same run in one process over four devices (this test process).
  one = pipeline.run(tiny_config(prune__method="magnitude", train__steps=4,
                                 checkpoint__every_steps=2, export__hf=True),
                     str(tmp_path / "one"))
  assert one["runtime"]["processes"] == 1 and one["runtime"]["devices"] == 4
  assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
  assert two["oneshot"]["perplexity"] == pytest.approx(one["oneshot"]["perplexity"], rel=1e-5)
  assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-5)
  assert two["sparsity"] == one["sparsity"]
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  a, b = (load_file(os.path.join(d, "export", "model.safetensors"))
          for d in (workdir, tmp_path / "one"))
  assert a.keys() == b.keys()
  for k in a:  # the pruned weights are exactly zero in both; the rest agree to float rounding
    np.testing.assert_array_equal(a[k] == 0, b[k] == 0, err_msg=k)
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)

  # Only process 0 wrote files (Orbax's checkpoints aside, which it coordinates itself).
  assert _written(tmp_path, "ft", 1) == set()
  written = _written(tmp_path, "ft", 0)
  for name in ("results.json", "log.jsonl", "metrics.jsonl", ".lock"):
    assert name in written, written
  assert any(w.startswith("export") for w in written)


def test_two_processes_with_a_sharded_state_match_one_replicated(tmp_path):
  """mesh.fsdp=-1 over 2 processes x 4 devices: parameters, masks and AdamW moments split over
  all 8 devices, the checkpoints written by both processes; the same numbers as one process
  holding everything on its 4 devices (dropout is off in tests/tiny.py)."""
  workdir = tmp_path / "sharded"
  # 64 wide: the MLP kernels and the embedding reach parallel.FSDP_MIN_SIZE and are split.
  flags = FINETUNE + ["--config.mesh.fsdp=-1", "--config.model.n_embd=64"]
  with _two_processes(tmp_path, workdir, flags, "fsdp", devices=4) as procs:
    codes = _wait(procs, tmp_path, "fsdp")
  assert codes == [0, 0], (_stderr(tmp_path, "fsdp", 0)[-2000:]
                           + _stderr(tmp_path, "fsdp", 1)[-2000:])
  two = json.load(open(workdir / "results.json"))
  assert two["runtime"]["processes"] == 2 and two["runtime"]["devices"] == 8
  one = pipeline.run(tiny_config(prune__method="magnitude", train__steps=4,
                                 checkpoint__every_steps=2, export__hf=True, model__n_embd=64),
                     str(tmp_path / "replicated"))
  assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
  assert two["train"]["final_loss"] == pytest.approx(one["train"]["final_loss"], rel=1e-5)
  assert two["sparsity"] == one["sparsity"]
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  a, b = (load_file(os.path.join(d, "export", "model.safetensors"))
          for d in (workdir, tmp_path / "replicated"))
  for k in a:
    np.testing.assert_array_equal(a[k] == 0, b[k] == 0, err_msg=k)
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def _stop_one(tmp_path, workdir, flags, tag, who, sig):
  """Starts the job, sends `sig` to process `who` after two steps; returns the exit codes and
  each process's last stderr line."""
  with _two_processes(tmp_path, workdir, flags, tag) as procs:
    deadline = time.time() + 180
    while not cli.last_step_logged(workdir) >= 2:  # tiny.py logs every step
      assert all(p.poll() is None for p in procs), _stderr(tmp_path, tag, 0)[-3000:]
      assert time.time() < deadline
      time.sleep(0.05)
    procs[who].send_signal(sig)  # only this process is told
    codes = _wait(procs, tmp_path, tag)
  assert "Traceback" not in _stderr(tmp_path, tag, 0) + _stderr(tmp_path, tag, 1)
  return codes, [_stderr(tmp_path, tag, i).strip().splitlines()[-1] for i in range(2)]


def _saved_step(line):
  return int(line.split("checkpoint saved at step ")[1].split()[0])


def test_sigterm_to_one_process_stops_both_with_a_checkpoint_and_both_resume(tmp_path):
  workdir = tmp_path / "run"
  flags = ["--config.train.steps=30", "--config.checkpoint.every_steps=1000"]
  codes, lines = _stop_one(tmp_path, workdir, flags, "term", 1, signal.SIGTERM)
  assert codes == [143, 143], lines
  assert lines[0] == lines[1] and lines[0].startswith("preempted: SIGTERM: checkpoint saved at "
                                                      "step "), lines
  saved = _saved_step(lines[0])
  assert 2 <= saved < 30 and not (workdir / "results.json").exists()
  assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == saved

  with _two_processes(tmp_path, workdir, flags, "resume") as procs:  # the same command
    codes = _wait(procs, tmp_path, "resume")
  assert codes == [0, 0], _stderr(tmp_path, "resume", 0)[-2000:]
  results = json.load(open(workdir / "results.json"))
  assert results["train"]["steps"] == 30 and results["runtime"]["processes"] == 2
  resumed = [json.loads(l) for l in open(workdir / "log.jsonl") if '"resume"' in l]
  assert [e["step"] for e in resumed] == [saved]


def test_ctrl_c_on_one_process_stops_both_at_one_step(tmp_path):
  """Ctrl-C reaches one process; it asks jax's preemption notifier (by SIGTERM to itself) and
  both stop at the step they agree on: 130 where Ctrl-C was pressed, 143 on the other."""
  workdir = tmp_path / "run"
  flags = ["--config.train.steps=300", "--config.checkpoint.every_steps=1000"]
  codes, lines = _stop_one(tmp_path, workdir, flags, "int", 0, signal.SIGINT)
  assert codes == [130, 143], lines
  assert lines[0].startswith("interrupted: SIGINT: checkpoint saved at step "), lines
  assert lines[1].startswith("preempted: SIGTERM: checkpoint saved at step "), lines
  assert _saved_step(lines[0]) == _saved_step(lines[1])
  assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == _saved_step(lines[0])



def test_two_processes_fall_back_alike_from_a_damaged_step(tmp_path):
  """Issue 29 on two processes: the newest step's largest file cut in half; both processes set
  it aside with one line each, resume from the same step and end bitwise as uninterrupted."""
  import shutil  # pylint: disable=import-outside-toplevel
  flags = ["--config.train.steps=6", "--config.checkpoint.every_steps=2",
           "--config.export.hf=true"]
  reference = tmp_path / "reference"
  with _two_processes(tmp_path, reference, flags, "ref") as procs:
    assert _wait(procs, tmp_path, "ref") == [0, 0], _stderr(tmp_path, "ref", 0)[-2000:]
  workdir = tmp_path / "damaged"
  shutil.copytree(reference, workdir)
  (workdir / "results.json").unlink()  # as if killed right after its last checkpoint
  largest = max((f for f in (workdir / "checkpoints" / "6").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  with _two_processes(tmp_path, workdir, flags, "again") as procs:
    codes = _wait(procs, tmp_path, "again")
  assert codes == [0, 0], _stderr(tmp_path, "again", 0)[-2000:]
  for i in range(2):
    text = _stderr(tmp_path, "again", i)
    assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
    warned = [l for l in text.splitlines() if "does not restore" in l]
    assert len(warned) == 1 and "Checkpoint step 6 " in warned[0], warned
  resumed = [json.loads(l) for l in open(workdir / "log.jsonl") if '"resume"' in l]
  assert [e["step"] for e in resumed] == [4]
  cli.assert_same_params(cli.exported_params(workdir), cli.exported_params(reference))
