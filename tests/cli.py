"""The command line as the tests drive it: build a command, run it or start it, wait for what it
writes, signal it, and read what it left in its workdir (metrics, log events, checkpoints, the
exported weights). Every command runs from this checkout with conftest.subprocess_env (one CPU
device)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, TINY_CONFIG, subprocess_env


def command(workdir, *flags, config=TINY_CONFIG, module="blockprune_jax.main"):
  """`python -m blockprune_jax.main --config=tests/tiny.py --workdir=...` and `flags`."""
  return [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}", *flags]


def run(cmd, env=None, timeout=600, check=False):
  """Runs `cmd` to its end; output captured as text. check: it must exit 0 without a traceback."""
  r = subprocess.run(cmd, env=env or subprocess_env(), cwd=REPO, capture_output=True, text=True,
                     timeout=timeout)
  if check:
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  return r


def start(cmd, err_path, env=None):
  """Starts `cmd` in the background, its stderr into `err_path` (a file cannot fill up and block
  the run the way an unread pipe does)."""
  with open(err_path, "w") as err:
    return subprocess.Popen(cmd, env=env or subprocess_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err)


def wait_for(proc, condition, err_path, timeout=180):
  """Polls `condition()` while `proc` runs; fails with its stderr if it exits first."""
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, "exited too early:\n" + open(err_path).read()[-3000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


def stop(proc, sig=signal.SIGKILL, timeout=120):
  """Sends `sig` and returns the exit code (SIGKILL: the run can save nothing more)."""
  proc.send_signal(sig)
  return proc.wait(timeout=timeout)


def last_step_logged(workdir):
  """The newest training step in metrics.jsonl; 0 before the first."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  return max((json.loads(l)["step"] for l in open(path) if '"train"' in l), default=0)


def checkpoint_steps(ckpt_dir):
  """The committed checkpoint steps in `ckpt_dir`, oldest first; none when it does not exist."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())


def events(workdir, kind):
  """The log.jsonl events of this kind ("start", "resume", ...)."""
  return [e for e in map(json.loads, open(os.path.join(workdir, "log.jsonl")))
          if e["event"] == kind]


def exported_params(workdir):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def assert_same_params(a, b, what=""):
  """Bitwise the same weights, named by key on a difference."""
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}{k}")
