"""Storage faults: every writer on a disk that is really full ends in one NoSpace line naming
what, where and the free space, leaving no partial file; a compilation cache that cannot be
written is one warning; a damaged checkpoint is one warning line, try after try; a damaged
merges.txt is one line.

The full run on a full disk (exit code, resume bitwise) is in test_faults.py; here each writer
is called directly on a small tmpfs filled to the last byte (skipped where mounting is not
allowed), or given the error a full disk raises where its write happens out of reach.
"""
import errno
import json
import os
import sys
import threading
import types

import numpy as np
import pytest

from blockprune_jax import checkpoint
from blockprune_jax import data as data_lib
from blockprune_jax import files
from blockprune_jax import hf_io
from blockprune_jax import logs
from blockprune_jax import model as model_lib
from blockprune_jax import sweep
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax import wandb_log
from blockprune_jax.errors import NoSpace, UserError
import cli
from conftest import tiny_config

NO_SPACE = "No space left on device writing "


def _fill(directory):
  """Writes one file until the filesystem of `directory` is full."""
  fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
  try:
    while os.write(fd, b"\0" * 4096):
      pass
  except OSError as e:
    assert e.errno == errno.ENOSPC, e
  finally:
    os.close(fd)
  assert files.free_space(directory) == 0


@pytest.fixture
def full_disk(small_disk):
  return small_disk(512)


def _assert_one_line(e, what, path):
  text = str(e.value)
  assert "\n" not in text, text
  assert text.startswith(f"{NO_SPACE}{what} to {path} ("), text
  assert text.endswith(" free); free space and run the same command again to resume"), text


def _no_temporaries(directory):
  return [p for p in os.listdir(directory) if ".tmp-" in p]


# --- each writer on a full disk --------------------------------------------------------------

def test_results_json_on_a_full_disk_keeps_the_old_file(full_disk):
  path = full_disk / "results.json"
  files.write_json(path, {"old": 1})
  _fill(full_disk)
  with pytest.raises(NoSpace) as e:
    files.write_json(path, {"new": list(range(100000))})
  _assert_one_line(e, "results.json", path)
  assert json.load(open(path)) == {"old": 1} and not _no_temporaries(full_disk)


def test_an_export_on_a_full_disk_leaves_no_half_export(full_disk):
  cfg = model_lib.GPT2Config(vocab_size=257, n_layer=2, n_embd=32, n_head=2, n_positions=64)
  _fill(full_disk)
  with pytest.raises(NoSpace) as e:
    hf_io.export(model_lib.init_params(cfg, 0), cfg, str(full_disk / "export"))
  _assert_one_line(e, "export", full_disk / "export")
  assert sorted(os.listdir(full_disk)) == ["filler"]


def test_the_token_cache_on_a_full_disk(full_disk):
  config = tiny_config(data__cache_dir=str(full_disk / "cache"))
  tok = tok_lib.load_tokenizer("", config.data.tokenizer)
  path = data_lib.cache_path(config.data, "validation", tok)
  os.makedirs(os.path.dirname(path))
  _fill(full_disk)
  with pytest.raises(NoSpace) as e:
    data_lib.token_stream(config.data, "validation", tok)
  _assert_one_line(e, "the token cache", path)
  assert os.listdir(full_disk / "cache") == []


def test_a_log_line_on_a_full_disk_is_cut_off_whole(full_disk):
  log = full_disk / "log.jsonl"
  files.append_line(log, '{"event": "start"}')
  _fill(full_disk)
  with pytest.raises(NoSpace) as e:
    files.append_line(log, json.dumps({"event": "eval", "pad": "x" * 20000}))
  _assert_one_line(e, "log.jsonl", log)
  assert open(log).read() == '{"event": "start"}\n'  # a resumed run appends whole lines


def test_the_wandb_id_and_directory_on_a_full_disk(full_disk, monkeypatch):
  _fill(full_disk)
  with pytest.raises(NoSpace) as e:
    wandb_log.write_id(str(full_disk / wandb_log.ID_FILE), "abc123")
  _assert_one_line(e, "the W&B run id", full_disk / wandb_log.ID_FILE)
  assert not _no_temporaries(full_disk)

  # wandb.init writes its run directory itself (and from its service process): a full disk
  # there arrives as whatever W&B wraps the OSError in.
  def init(**kwargs):
    raise RuntimeError("wandb.init failed") from OSError(errno.ENOSPC, "No space left on device")
  fake = types.SimpleNamespace(init=init)
  with pytest.raises(NoSpace) as e:
    wandb_log.init_run(fake, "offline", run_id=None, dir=str(full_disk))
  _assert_one_line(e, "the W&B run directory", full_disk)


def test_a_dead_tensorboard_writer_ends_the_run_in_one_line(tmp_path, capfd):
  log = logs.RunLog(str(tmp_path / "run"), echo=False)
  if log._tb is None:  # pylint: disable=protected-access
    pytest.skip("tensorboardX is not installed")
  # tensorboardX writes from its own thread; a full disk kills that thread (seen for real on a
  # full tmpfs) and its queue would then block the run. The same death, from a function that
  # lives (by its file name) in tensorboardX:
  namespace = {}
  exec(compile("import errno\ndef write():\n  raise OSError(errno.ENOSPC, 'No space left on "
               "device')\n", "/site-packages/tensorboardX/event_file_writer.py", "exec"),
       namespace)
  thread = threading.Thread(target=namespace["write"])
  thread.start()
  thread.join()
  try:
    with pytest.raises(NoSpace) as e:
      log.metric(1, "train", loss=1.0)
    _assert_one_line(e, "TensorBoard events", tmp_path / "run" / "tb")
  finally:
    logs._TB_NO_SPACE.clear()  # pylint: disable=protected-access
    log.close()
  assert "Traceback" not in capfd.readouterr().err  # the thread's death was kept quiet


def test_a_report_on_a_full_disk_is_one_line_and_exit_28(full_disk, capsys, monkeypatch):
  from blockprune_jax import report  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "report"))
  _fill(full_disk)
  assert report.main(["sweeps/odd", "--out", str(full_disk / "report")]) == 28
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"error: {NO_SPACE}"), err
  assert str(full_disk / "report") in err[0]


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_step(small_disk):
  disk = small_disk(256)
  state = {"params": {"w": np.ones((128, 128), np.float32)}}  # 64 KiB
  with checkpoint.Checkpointer(disk / "ckpt", keep=1, every_steps=1) as ckpt:
    ckpt.save(1, state)
    ckpt.wait()
    _fill(disk)
    with pytest.raises(NoSpace) as e:
      ckpt.save(2, state)
      ckpt.wait()
    _assert_one_line(e, "checkpoint step 2", disk / "ckpt")
  assert sorted(os.listdir(disk / "ckpt")) == ["1"]  # the partial step 2 was removed
  os.remove(disk / "filler")
  restored, _ = checkpoint.Checkpointer(disk / "ckpt").restore(state)
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])


def test_free_space_is_checked_before_training(small_disk, caplog):
  disk = small_disk(256)
  ckpt = checkpoint.Checkpointer(disk / "ckpt", keep=2, every_steps=1)
  small = {"w": np.zeros(1000, np.float32)}
  big = {"w": np.zeros(40000, np.float32)}  # 156 KiB: three of them do not fit
  assert ckpt.check_free_space(small)[0] == 3 * 4000
  assert not [r for r in caplog.records if "free for checkpoints" in r.getMessage()]
  needed, free = ckpt.check_free_space(big)
  assert needed == 3 * 160000 > free
  warned = [r.getMessage() for r in caplog.records if "free for checkpoints" in r.getMessage()]
  assert len(warned) == 1, warned
  assert files.human_bytes(free) in warned[0] and files.human_bytes(needed) in warned[0]
  ckpt.close()


def test_a_sweep_stops_at_a_full_disk(tmp_path):
  started = []

  def run_fn(config, workdir):
    started.append(workdir)
    raise files.no_space_error("results.json", os.path.join(workdir, "results.json"))
  with pytest.raises(NoSpace):
    sweep.run_sweep(tiny_config(), str(tmp_path), [{"seed": 0}, {"seed": 1}], run_fn=run_fn,
                    report=False)
  assert len(started) == 1  # the next run would only fail alike
  rows = json.load(open(tmp_path / "sweep.json"))["runs"]
  assert [r["status"] for r in rows] == ["interrupted", "pending"]


def test_a_full_disk_no_writer_named_is_still_one_line_and_exit_28(tmp_path, capsys):
  from blockprune_jax import main  # pylint: disable=import-outside-toplevel
  try:
    open(tmp_path / "x", "w").write("")
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
  except OSError as e:
    with pytest.raises(SystemExit) as exited:
      main._exit_for(e, str(tmp_path))  # pylint: disable=protected-access
  assert exited.value.code == main.EXIT_NO_SPACE == 28
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"error: {NO_SPACE}the run's files to {tmp_path / 'x'} ("), err


# --- the compilation cache -------------------------------------------------------------------

_COMPILE_ON_A_FULL_DISK = """
import sys
import jax, jax.numpy as jnp
from blockprune_jax import compile_stats
compile_stats.enable_persistent_cache(sys.argv[1])
for i in range(4):
  assert float(jax.jit(lambda x, i=i: x * i + 1)(jnp.ones(3))[0]) == i + 1
print("computed")
"""


@pytest.mark.slow
def test_a_compilation_cache_that_cannot_be_written_is_one_warning(small_disk):
  disk = small_disk(64)
  os.makedirs(disk / "jax_compile")
  _fill(disk)
  r = cli.run([sys.executable, "-c", _COMPILE_ON_A_FULL_DISK, str(disk / "jax_compile")],
              timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "computed", r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1, lines
  assert f"JAX compilation cache {disk / 'jax_compile'} cannot be written (No space left on " \
         "device; " in lines[0], lines
  # The entry cut short by the full disk is gone: a later process would fail to read it.
  assert not [p for p in os.listdir(disk / "jax_compile") if p.endswith("-cache")]


# --- damaged checkpoints, try after try --------------------------------------------------------

_DAMAGED_TRIES = """
import pathlib, sys
import numpy as np
from blockprune_jax import checkpoint

def state(seed):
  return {"params": {"w": np.random.RandomState(seed).randn(64, 64).astype(np.float32)},
          "step": np.array(seed, np.int32)}

def damage(step_dir, how):
  for f in step_dir.rglob("*"):
    data = f.read_bytes() if f.is_file() else None
    if data is None or (how != "truncate all" and f.parent.name != "d"):
      continue
    if how == "flip data":
      data = bytearray(data)
      data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data) if how == "flip data" else data[:len(data) // 2])

for i, how in enumerate(sys.argv[2:]):
  d = pathlib.Path(sys.argv[1]) / f"try{i}"
  with checkpoint.Checkpointer(d, keep=2, every_steps=1) as ckpt:
    ckpt.save(1, state(1))
    ckpt.save(2, state(2))
  damage(d / "2", how)
  with checkpoint.Checkpointer(d, keep=2, every_steps=1) as ckpt:
    assert int(ckpt.restore(state(0))[0]["step"]) == 1
print("restored")
"""


@pytest.mark.slow
@pytest.mark.parametrize("process", range(3))  # what asyncio prints at exit differs by run
def test_a_damaged_checkpoint_is_one_warning_line_try_after_try(tmp_path, process):
  kinds = ["truncate all", "truncate data", "flip data"]
  r = cli.run([sys.executable, "-c", _DAMAGED_TRIES, str(tmp_path), *kinds], timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "restored", r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "never retrieved" not in r.stderr, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == len(kinds), lines
  for i, line in enumerate(lines):
    assert f"Checkpoint step 2 in {tmp_path / f'try{i}'} does not restore (" in line, line
    assert f"moved it to {tmp_path / f'try{i}.unreadable'}/2-" in line, line
    reason = line.split("does not restore (")[1].split("); moved it")[0]
    assert len(reason) < 160, reason  # a few words, not TensorStore's spec
  del process


# Every file of a step x three kinds of damage, each in its own copy, all in one process: the
# Checkpointer-level half of issue 29's fuzz (test_faults.py runs the command line over them).
_FUZZ = """
import pathlib, shutil, sys
import numpy as np
import optax
from blockprune_jax import checkpoint

def state(seed):
  r = np.random.RandomState(seed)
  params = {"h": {"w": r.randn(64, 256).astype(np.float32)},
            "wte": r.randn(512, 64).astype(np.float32)}
  return {"params": params, "opt_state": optax.adamw(1e-3).init(params), "pos": seed,
          "step": np.array(seed, np.int32), "masks": {"h": {"w": r.rand(64, 256) > .5}}}

root = pathlib.Path(sys.argv[1])
with checkpoint.Checkpointer(root / "src", keep=3, every_steps=1) as ckpt:
  for step in (1, 2):
    ckpt.save(step, state(step))
names = sorted(str(f.relative_to(root / "src" / "2")) for f in (root / "src" / "2").rglob("*")
               if f.is_file())
kinds = ("half", "zeros", "delete")
for i, name in enumerate(names):
  for kind in kinds if sys.argv[2] == "all" else kinds[i % 3:i % 3 + 1]:
    d = root / f"{i}-{kind}"
    shutil.copytree(root / "src", d)
    f = d / "2" / name
    data = f.read_bytes()
    f.unlink() if kind == "delete" else f.write_bytes(
        data[:len(data) // 2] if kind == "half" else bytes(len(data)))
    print(f"case {d.name} {name}", flush=True)
    with checkpoint.Checkpointer(d, keep=3, every_steps=1) as ckpt:
      restored, _ = ckpt.restore(state(0))
    print(f"restored {int(restored['step'])}", flush=True)
"""


@pytest.mark.parametrize("damage", [
    "rotate",  # each file one kind, each kind on a third of the files
    pytest.param("all", marks=pytest.mark.slow)])
def test_every_file_of_a_damaged_step_is_one_warning_line(tmp_path, damage):
  r = cli.run([sys.executable, "-c", _FUZZ, str(tmp_path), damage], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
  cases = r.stdout.split("case ")[1:]
  # ocdbt data and manifests, Orbax's metadata, our meta and file list
  assert len(cases) >= (3 if damage == "all" else 1) * 15, r.stdout
  warned = [l for l in r.stderr.splitlines() if l.strip()]
  for case in cases:
    (directory, name), restored = case.split()[:2], case.split()[-1]
    lines = [l for l in warned if f"in {tmp_path / directory} does not restore (" in l]
    if name == "commit_success.txt":  # Orbax's GCS marker, written after the list: unread
      assert not lines and restored == "2", case
    else:
      assert len(lines) == 1 and restored == "1", (case, lines)
      assert "Checkpoint step 2 " in lines[0] and "moved it to" in lines[0], lines[0]
  # No line but these: nothing else from Orbax, asyncio or TensorStore.
  unread = sum(case.split()[1] == "commit_success.txt" for case in cases)
  assert len(warned) == len(cases) - unread, warned


# --- a damaged merges.txt ----------------------------------------------------------------------

@pytest.mark.parametrize("merges,names", [
    ("#version: 0.2\na b\nab\n", "line 3 is 'ab', not two tokens"),
    ("#version: 0.2\na x\n", "out of vocabulary"),
    (b"#version: 0.2\n\xff\xfe\x00a b\n", "UnicodeDecodeError"),
])
def test_a_damaged_merges_txt_is_one_line_naming_it(tmp_path, merges, names):
  vocab = {"a": 0, "b": 1, "ab": 2, tok_lib.EOS_TOKEN: 3}
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  path = tmp_path / "merges.txt"
  path.write_bytes(merges if isinstance(merges, bytes) else merges.encode())
  with pytest.raises(UserError) as e:
    tok_lib.load_tokenizer("", str(tmp_path))
  text = str(e.value)
  assert text.startswith(f"{path} is unreadable (") and names in text and "\n" not in text, text
