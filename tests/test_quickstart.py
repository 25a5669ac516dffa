"""The offline quickstart, shrunk: base model, three allocations x three seeds and the dense
controls, table, paired comparison and plot; a sweep killed part-way and restarted does not redo
finished runs."""
import json
import os

import pytest

import cli
from conftest import subprocess_env

pytestmark = pytest.mark.slow  # a whole study, twice

SHRINK = ["--config.model.n_layer=3", "--config.model.n_embd=32", "--config.model.n_head=2",
          "--config.model.n_positions=64", "--config.data.seq_len=32", "--config.base.steps=20",
          "--config.train.steps=4", "--config.eval.max_tokens=3000", "--config.train.log_every=5",
          "--config.train.batch_size=8", "--config.prune.sensitivity_ratios=0.4,0.8,0.95",
          "--config.prune.sensitivity_rounds=1"]


def _cmd(workdir):
  return cli.command(workdir, *SHRINK, config="configs/quickstart.py")


def test_quickstart_killed_and_restarted(tmp_path):
  workdir = tmp_path / "quickstart"
  first = workdir / "prune.allocation=uniform__seed=0" / "results.json"
  env = subprocess_env(BLOCKPRUNE_CACHE=str(tmp_path / "cache"))
  err = tmp_path / "killed.err"
  proc = cli.start(_cmd(workdir), err, env=env)
  cli.wait_for(proc, first.exists, err, timeout=300)
  cli.stop(proc)  # SIGKILL
  assert not (workdir / "report.md").exists()
  stamp = first.stat().st_mtime_ns
  base_stamp = (workdir / "base" / "results.json").stat().st_mtime_ns

  r = cli.run(_cmd(workdir), env=env, timeout=None)
  assert r.returncode == 0, r.stderr[-3000:]
  # Finished runs and the shared base model were not redone.
  assert first.stat().st_mtime_ns == stamp
  assert (workdir / "base" / "results.json").stat().st_mtime_ns == base_stamp
  assert os.path.isfile(workdir / "base" / "export" / "model.safetensors")
  sweep = json.load(open(workdir / "sweep.json"))
  assert sweep["counts"]["done"] == 12  # three allocations x three seeds, three controls

  # The table holds each run's measured numbers; the plot is a real picture.
  table = open(workdir / "report.md").read()
  for allocation in ("uniform", "linear", "sensitivity"):
    for seed in range(3):
      res = json.load(open(workdir / f"prune.allocation={allocation}__seed={seed}" / "results.json"))
      assert res["pruning"]["allocation"] == allocation
      assert abs(res["sparsity"]["overall"] - 0.8) < 0.01
      assert f"{res['perplexity']['validation']:.2f}" in table
      assert f"{res['oneshot']['perplexity']['validation']:.2f}" in table
  assert "## Paired comparison" in table and "| control |" in table
  assert os.path.getsize(workdir / "ppl_vs_sparsity.png") > 5000
  # The console: one line per run, and the answer at the end (means ± std over seeds, the paired
  # sentence); the table of every run is in report.md, not the console.
  out = r.stdout.rstrip().splitlines()
  assert r.stderr.count("] prune.allocation=") >= 2 and "| run |" not in r.stdout
  assert "Mean ± std over seeds, per setting:" in r.stdout
  assert out[-1].startswith("- Sparsity 0.8 (") and out[-1] in table
