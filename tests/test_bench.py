"""The benchmark entry runs and reports what it measured (speed itself is not asserted)."""
import json
import os
import subprocess
import sys

import pytest

import cli
from conftest import REPO, subprocess_env


@pytest.mark.slow
@pytest.mark.parametrize("what,last,n", [("train", "train", 1), ("compact", "compact_speedup", 2)])
def test_bench_prints_json_lines(what, last, n):
  out = cli.run([sys.executable, "-m", "blockprune_jax.bench", what, "--preset=tiny",
                 "--seq_len=32", "--batch=2", "--steps=1", "--dtype=float32"], check=True).stdout
  lines = [json.loads(l) for l in out.splitlines()]  # JSON lines only, nothing else
  assert lines[-1]["bench"] == last
  measured = [l for l in lines if "tokens_per_s" in l]
  assert len(measured) == n and all(l["tokens_per_s"] > 0 for l in measured)
  assert measured[0]["gflop_per_token"] > 0 and measured[0]["backend"] == "cpu"


@pytest.mark.slow
def test_bench_refuses_meaningless_settings():
  out = cli.run([sys.executable, "-m", "blockprune_jax.bench", "train", "--preset=tiny",
                 "--steps=0"])
  assert out.returncode != 0 and "--steps=0" in out.stderr and not out.stdout.strip()


@pytest.mark.slow
def test_gpu_bench_script_tiny(tmp_path):
  """launch/gpu_bench.sh --tiny on the CPU: every step runs and writes its records."""
  out_dir = tmp_path / "bench"
  env = subprocess_env(JAX_PLATFORMS="cpu", PYTHON=sys.executable,
                       BENCH_SITE=str(tmp_path / "site"))
  script = os.path.join(REPO, "launch", "gpu_bench.sh")
  run = subprocess.run(["bash", script, str(out_dir), "--tiny"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
  recs = [json.loads(l) for l in (out_dir / "figures.jsonl").read_text().splitlines()]
  assert not [r for r in recs if "error" in r]
  by = {}
  for r in recs:
    by.setdefault(r["bench"], []).append(r)
  assert by["meta"][0]["tiny"] is True
  checks = by["check_logits"] + by["check_perplexity"]
  assert sorted(r["dtype"] for r in checks) == ["bfloat16", "bfloat16", "float32", "float32"]
  assert all(r["pass"] is True and r["err"] <= r["tol"] for r in checks)
  for name in ("eval", "eval_compact", "train", "train_masked"):
    (r,) = by[name]
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
    assert r["gflop_per_token"] > 0 and r["backend"] == "cpu" and r["jax"] and r["date"]
  assert by["compact_speedup"][0]["speedup"] > 0
  mask = by["mask_overhead"][0]
  assert mask["dense_tokens_per_s"] > 0 and mask["masked_tokens_per_s"] > 0
  for name in ("torch_eval", "torch_train"):
    assert sorted(r["impl"] for r in by[name]) == ["sdpa", "sdpa+compile"]
    assert all(r["tokens_per_s"] > 0 and r["gflop_per_token"] > 0 for r in by[name])
  assert sorted((r["step"], r["mode"]) for r in by["side_by_side"]) == [
      ("eval", "map"), ("eval", "vmap"), ("train", "map"), ("train", "vmap")]
  assert all(r["per_run_ratio"] > 0 for r in by["side_by_side"])
  (sweep,) = by["sweep"]
  assert sweep["batch_runs"] == 3 and sweep["side_by_side_ratio"] > 0
  assert sweep["max_perplexity_diff"] < 1e-2
  assert {r["step"] for r in by["step_time"] if r["rc"] == 0} >= {
      "check", "jax_all", "side_by_side", "sweep", "torch"}
  table = (out_dir / "summary.txt").read_text()
  assert "train" in table and table.count("PASS") == 4 and "FAIL" not in table
  assert "side by side (ratio" in table


@pytest.mark.slow
def test_gpu_bench_script_records_skipped_steps(tmp_path):
  """With no time left every step is skipped, recorded as an error, and the script fails."""
  env = subprocess_env(JAX_PLATFORMS="cpu", PYTHON=sys.executable, BENCH_BUDGET_S="0")
  run = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_bench.sh"), str(tmp_path),
                        "--tiny"], env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 1
  recs = [json.loads(l) for l in (tmp_path / "figures.jsonl").read_text().splitlines()]
  errors = {r["bench"]: r["error"] for r in recs if "error" in r}
  assert set(errors) == {"check", "jax_all", "side_by_side", "sweep", "torch"}
  assert all(e.startswith("skipped") for e in errors.values())
  assert "ERROR jax_all: skipped" in run.stdout


@pytest.mark.slow
def test_bench_sweep_reports_a_sweeps_cost_beyond_its_steps(tmp_path):
  from blockprune_jax.bench import sweep as bench_sweep  # pylint: disable=import-outside-toplevel
  r = bench_sweep.run(preset_shape=(2, 32, 2), seq_len=32, batch=8, dtype="float32",
                      vocab_size=257, steps=6, runs=3, workdir=str(tmp_path / "sweep"))
  assert r["runs"] == 3 and r["runs_per_hour"] > 0
  assert r["compilations_later"] == [0, 0]  # runs after the first reuse every compiled step
  assert 0 <= r["overhead_share_later"] < r["overhead_share_first"] <= 1
  assert r["projected_216_runs_s"] > r["first_run_s"]
  assert "side_by_side_ratio" not in r  # only asked for with batch_runs > 1
