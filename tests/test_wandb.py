"""Weights & Biases logging in offline mode (no network): what a run writes, resuming the same W&B
run after a preemption, the sweep report run, errors, and launch/wandb_sweep.yaml's command line.

wandb 0.31 writes an offline run as <workdir>/wandb/offline-run-<time>-<id>/run-<id>.wandb, a
LevelDB-style log of `wandb_internal_pb2.Record` protobufs (files/config.yaml and
wandb-summary.json appear only once synced); `read_records` below reads it.
"""
import glob
import json
import os
import struct
import sys
import textwrap
import time
import zlib

import pytest

from blockprune_jax import preemption
from blockprune_jax import pipeline
from blockprune_jax import wandb_log
from blockprune_jax.errors import Preempted, UserError
from blockprune_jax.logs import RunLog
import cli
from conftest import REPO, subprocess_env, tiny_config

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402  pylint: disable=wrong-import-position

SWEEP_YAML = os.path.join(REPO, "launch", "wandb_sweep.yaml")


# --- reading offline runs back ---------------------------------------------------------------

def read_records(path):
  """The Records of a .wandb file: a 7-byte header (':W&B', 0xBEE1, version), then 32 KiB blocks
  of chunks [crc32 (4), length (2), type (1): 1 full, 2 first, 3 middle, 4 last] + data."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", path
  records, pos, parts = [], 7, []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
      pos += 32768 - pos % 32768
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind == 0 and length == 0:
      continue
    assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, path
    parts.append(chunk)
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(parts))
      records.append(record)
      parts = []
  return records


def _items(items):
  """{key: value} of summary / history / config items; media values come as nested keys
  (["plots/x", "_type"], ...) and are put back together as dicts."""
  out = {}
  for it in items:
    *parents, leaf = [it.key] if it.key else list(it.nested_key)
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = json.loads(it.value_json)
  return out


def offline_run(records):
  """{id, name, group, job_type, config, history: [{key: value}], summary, preempting, exit}."""
  out = {"history": [], "summary": {}, "config": {}, "preempting": False, "exit": None}
  for r in records:
    kind = r.WhichOneof("record_type")
    if kind == "run":
      out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group,
                 job_type=r.run.job_type)
      out["config"].update(_items(r.run.config.update))
    elif kind == "config":
      out["config"].update(_items(r.config.update))
    elif kind == "history":
      out["history"].append(_items(r.history.item))
    elif kind == "summary":
      out["summary"].update(_items(r.summary.update))
    elif kind == "preempting":
      out["preempting"] = True
    elif kind == "exit":
      out["exit"] = r.exit.exit_code
  return out


def offline_runs(wandb_parent):
  """The offline runs under <wandb_parent>/wandb, oldest first, with their directory."""
  runs = []
  for d in sorted(glob.glob(os.path.join(str(wandb_parent), "wandb", "offline-run-*"))):
    (path,) = glob.glob(os.path.join(d, "run-*.wandb"))
    # W&B's service process writes the file; finish() can return a moment before its last
    # block reaches the disk, so wait (bounded) for the run's records to be there.
    deadline = time.time() + 20
    while True:
      try:
        run = offline_run(read_records(path))
      except Exception:  # pylint: disable=broad-except  # a block still being written
        run = {}
      if ("id" in run and run.get("exit") is not None) or time.time() > deadline:
        break
      time.sleep(0.2)
    runs.append(dict(run, dir=d))
  return runs


def train_steps(run):
  return sorted(h["_step"] for h in run["history"] if "train/loss" in h)


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
  """W&B offline, silent, and with its own directories: nothing leaves the machine."""
  home = tmp_path_factory.mktemp("wandb_home")
  with pytest.MonkeyPatch.context() as mp:
    for var in ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_RESUME",
                "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_API_KEY"):
      mp.delenv(var, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DISABLE_GIT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
      mp.setenv(var, str(home))
    yield


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, offline_env):  # pylint: disable=unused-argument,redefined-outer-name
  """A 4-step tiny run preempted after its step-2 checkpoint, then run again to the end."""
  workdir = str(tmp_path_factory.mktemp("wandb_runs") / "run")
  config = tiny_config(train__steps=4, checkpoint__every_steps=2, wandb__mode="offline",
                       wandb__project="bp-test", eval__max_tokens=500)
  with pytest.MonkeyPatch.context() as mp:
    # The real SIGTERM path of train.fit: save the step, log "preempted", raise Preempted.
    mp.setattr(preemption.PreemptionFlag, "check", lambda self, step: step == 2)
    with pytest.raises(Preempted):
      pipeline.run(config, workdir)
  with open(os.path.join(workdir, wandb_log.ID_FILE)) as f:
    first_id = f.read().strip()
  results = pipeline.run(config, workdir)
  return {"workdir": workdir, "config": config, "first_id": first_id, "results": results,
          "runs": offline_runs(workdir)}


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_offline_run_has_config_metrics_and_results(resumed_run):  # pylint: disable=redefined-outer-name
  last = resumed_run["runs"][-1]
  config, results = resumed_run["config"], resumed_run["results"]
  assert last["name"] == "run" and last["job_type"] == "experiment" and last["group"] == ""
  # The whole config, nested as config.to_dict() gives it.
  assert last["config"]["train"]["steps"] == 4
  assert last["config"]["model"]["n_layer"] == config.model.n_layer
  assert last["config"]["wandb"]["mode"] == "offline"
  # Training metrics as train/<key> at their step.
  h4 = [h for h in last["history"] if h.get("_step") == 4 and "train/loss" in h]
  assert h4 and h4[0]["train/loss"] == pytest.approx(results["train"]["final_loss"])
  assert {"train/learning_rate", "train/grad_norm"} <= set(h4[0])
  # results.json, flattened, as the summary.
  s = last["summary"]
  assert s["perplexity/validation"] == pytest.approx(results["perplexity"]["validation"])
  assert s["sparsity/overall"] == pytest.approx(results["sparsity"]["overall"])
  assert s["train/final_loss"] == pytest.approx(results["train"]["final_loss"])
  assert s["eval/validation/tokens_scored"] == results["eval"]["validation"]["tokens_scored"]
  assert not any(k.startswith("config/") for k in s)
  assert last["exit"] == 0


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(resumed_run):  # pylint: disable=redefined-outer-name
  first, second = resumed_run["runs"]  # one offline directory per process part, same id
  with open(os.path.join(resumed_run["workdir"], wandb_log.ID_FILE)) as f:
    saved = f.read().strip()
  assert saved == resumed_run["first_id"] == first["id"] == second["id"]
  assert first["dir"].endswith("-" + saved) and second["dir"].endswith("-" + saved)
  assert train_steps(first) == [1, 2] and first["preempting"]  # marked preempted, not crashed
  assert train_steps(second) == [3, 4]  # resumed from the step-2 checkpoint
  assert "perplexity/validation" not in first["summary"]
  assert "perplexity/validation" in second["summary"]
  assert not glob.glob(os.path.join(resumed_run["workdir"], wandb_log.ID_FILE + ".tmp"))


@pytest.mark.slow
def test_finished_workdir_does_not_start_wandb(resumed_run):  # pylint: disable=redefined-outer-name
  pipeline.run(resumed_run["config"], resumed_run["workdir"])  # results.json: only reported
  assert len(offline_runs(resumed_run["workdir"])) == 2


@pytest.mark.slow
def test_log_report_adds_a_report_run(resumed_run, tmp_path):  # pylint: disable=redefined-outer-name
  from blockprune_jax import report  # pylint: disable=import-outside-toplevel
  sweep_dir = tmp_path / "grid"
  files = report.write_report(str(sweep_dir), [os.path.dirname(resumed_run["workdir"])])
  config = tiny_config(wandb__mode="offline", wandb__project="bp-test")
  run_id = wandb_log.log_report(config, str(sweep_dir), files)
  assert (sweep_dir / wandb_log.REPORT_ID_FILE).read_text().strip() == run_id
  (run,) = offline_runs(sweep_dir)
  assert (run["id"], run["name"], run["group"], run["job_type"]) == (run_id, "report", "grid",
                                                                      "report")
  logged = {k: v for h in run["history"] for k, v in h.items()}
  assert logged["report/report"]["_type"] == "table-file"
  with open(os.path.join(run["dir"], "files", logged["report/report"]["path"])) as f:
    table = json.load(f)
  assert table["data"] and any("perplexity" in c or "ppl" in c for c in table["columns"])
  pngs = [k for k in files if files[k].endswith(".png")]
  assert pngs and all(logged[f"plots/{os.path.basename(files[k])[:-4]}"]["_type"] == "image-file"
                      for k in pngs)
  saved = os.listdir(os.path.join(run["dir"], "files"))
  assert "report.md" in saved and "report.csv" in saved
  assert wandb_log.log_report(tiny_config(), str(sweep_dir), files) is None  # disabled: nothing


def test_group_is_the_sweeps_name_inside_a_sweep(tmp_path):
  (tmp_path / "grid").mkdir()
  (tmp_path / "grid" / "sweep.json").write_text("{}")
  assert wandb_log.group_for(tiny_config(), str(tmp_path / "grid" / "seed=1")) == "grid"
  assert wandb_log.group_for(tiny_config(), str(tmp_path / "alone")) is None
  assert wandb_log.group_for(tiny_config(wandb__group="g"), str(tmp_path / "alone")) == "g"


@pytest.mark.slow
def test_disabled_never_imports_wandb(tmp_path):
  """A fresh process (this one has wandb loaded): a whole run with wandb.mode=disabled, then the
  metric path (an evaluation-only run keeps this cheap; training adds only metric calls)."""
  code = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.path.join(REPO, "tests")!r})
      from conftest import tiny_config
      from blockprune_jax import pipeline
      from blockprune_jax.logs import RunLog
      config = tiny_config(eval__max_tokens=200)
      pipeline.run(config, {str(tmp_path / "run")!r})
      with RunLog({str(tmp_path / "log")!r}, config=config) as log:
        log.metric(1, "train", loss=1.0)
        log.finish({{"perplexity": {{"validation": 2.0}}}}, images=["missing.png"])
      print("WANDB_IMPORTED", "wandb" in sys.modules)
  """)
  out = cli.run([sys.executable, "-c", code], timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "WANDB_IMPORTED False" in out.stdout
  assert not os.path.exists(tmp_path / "run" / "wandb")
  assert not os.path.exists(tmp_path / "run" / wandb_log.ID_FILE)


def test_bad_mode_is_a_one_line_user_error(tmp_path):
  with pytest.raises(UserError, match=r"^wandb\.mode='on' is not one of disabled, online, "
                                      r"offline$"):
    pipeline.run(tiny_config(wandb__mode="on"), str(tmp_path / "run"))


def test_missing_wandb_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
  with pytest.raises(UserError, match=r"pip install .*wandb.*wandb\.mode=disabled") as e:
    RunLog(str(tmp_path / "run"), config=tiny_config(wandb__mode="offline"))
  assert "\n" not in str(e.value)
  RunLog(str(tmp_path / "run2"), config=tiny_config()).close()  # disabled: fine without it


# --- launch/wandb_sweep.yaml -----------------------------------------------------------------

_FLAG_CHECKER = """
import json, sys
from absl import flags
from blockprune_jax import main  # defines --config and --workdir exactly as the real run does
args = sys.argv[1:]
assert args[:2] == ["-m", "blockprune_jax.main"], args
flags.FLAGS(["blockprune_jax.main"] + args[2:])
c = main._CONFIG.value
print(json.dumps({"workdir": flags.FLAGS.workdir, "ratios": list(c.prune.ratios),
                  "allocation": c.prune.allocation, "mode": c.wandb.mode}))
"""


def agent_command(sweep, params):
  """The argv W&B's agent builds for `params` (wandb_agent.Agent._command_run, non-Windows)."""
  from wandb.sdk.launch.sweeps import utils  # pylint: disable=import-outside-toplevel
  command = utils.create_sweep_command(list(sweep["command"]))
  sweep_vars = utils.create_sweep_command_args({"args": {k: {"value": v}
                                                         for k, v in params.items()}})
  sweep_vars.update(interpreter=["python"], program=[sweep["program"]], env=["/usr/bin/env"])
  argv = []
  for chunk in map(str, command):
    if chunk.startswith("${") and chunk.endswith("}"):
      argv += sweep_vars.get(chunk[2:-1]) or []
    else:
      argv.append(chunk)
  return argv


@pytest.mark.slow
def test_sweep_yaml_command_parses_to_the_ratios(tmp_path):
  import yaml  # pylint: disable=import-outside-toplevel
  with open(SWEEP_YAML) as f:
    sweep = yaml.safe_load(f)
  assert sweep["method"] == "random"
  assert sweep["metric"] == {"name": "perplexity/validation", "goal": "minimize"}
  grid = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]
  assert {k: v["values"] for k, v in sweep["parameters"].items()} == {
      "front": grid, "middle": grid, "back": grid}
  # Run the exact argv with `python` replaced by a flag parser (no experiment runs).
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "check_flags.py").write_text(_FLAG_CHECKER)
  shim = bin_dir / "python"
  shim.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'check_flags.py'} \"$@\"\n")
  shim.chmod(0o755)
  env = subprocess_env(WANDB_RUN_ID="abc123xy")
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  # W&B may hand 0.0 back as 0 (JSON): both must parse.
  for params, ratios in (({"front": 0.0, "middle": 0.5, "back": 0.9}, [0.0, 0.5, 0.9]),
                         ({"back": 0.1, "front": 0, "middle": 0.7}, [0, 0.7, 0.1])):
    argv = agent_command(sweep, params)
    out = cli.run(argv, env=env, timeout=60)
    assert out.returncode == 0, (argv, out.stderr[-3000:])
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"workdir": "runs/wandb/abc123xy", "ratios": ratios, "allocation": "explicit",
                   "mode": "online"}
