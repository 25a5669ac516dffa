"""Sweep expansion, resumable sweeps and the report, with a fake run function (no JAX work)."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from blockprune_jax import config_lib
from blockprune_jax import report
from blockprune_jax import sweep
from blockprune_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_config():
  spec = importlib.util.spec_from_file_location("_base_cfg", os.path.join(ROOT, "configs/base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.prune.method = "magnitude"
  config.prune.allocation = "explicit"
  config.model.n_layer = 12
  config.lock()
  return config


# ----------------------------------------------------------------------------------------------
# A fake pipeline.run: results.json in the schema of the README's results.json section, numbers that depend on the config.
# ----------------------------------------------------------------------------------------------


def fake_ppl(config) -> float:
  if config.prune.method == "none":
    return 21.76
  r = list(config.prune.ratios)
  if config.prune.allocation == "layer":
    return 22.0 + 2.0 * max(r) * (1 + r.index(max(r)) / 12)
  front, mid, back = r
  return 20.0 + 30 * front ** 2 + 10 * mid ** 2 + 4 * back ** 2 + 0.1 * config.seed


def fake_results(config) -> dict:
  ratios = [float(x) for x in config.prune.ratios] or [0.0, 0.0, 0.0]
  n_layer = config.model.n_layer
  layer = config.prune.allocation == "layer"
  per_layer = ratios if layer else [ratios[b] for b in range(3) for _ in range(n_layer // 3)]
  per_block = [sum(per_layer[i:i + 4]) / 4 for i in range(0, 12, 4)]
  ppl = fake_ppl(config)
  return {
      "config": config.to_dict(),
      "model": {"n_layer": n_layer, "n_embd": 768, "params_total": 124439808,
                "params_nonzero": 100000000},
      "perplexity": {"validation": ppl, "test": ppl * 0.96},
      "eval": {"validation": {"loss": math.log(ppl), "tokens_scored": 247289,
                              "tokens_per_s": 1.4e6}},
      "pruning": {"method": config.prune.method, "allocation": config.prune.allocation,
                  "block_layers": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]],
                  "ratios_per_block": None if layer else ratios, "ratios_per_layer": per_layer},
      "sparsity": {"overall": sum(per_layer) / len(per_layer), "per_block": per_block,
                   "per_layer": [{"layer": i, "block": i // 4, "c_fc": r, "c_proj": r}
                                 for i, r in enumerate(per_layer)]},
      "train": {"steps": 20, "tokens": 20 * 8 * 1024, "final_loss": math.log(ppl) - 0.05,
                "tokens_per_s": 3.7e5},
      "runtime": {"backend": "cpu", "devices": 1, "device_kind": "cpu", "seconds": 1.0},
  }


def fake_run(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  res = fake_results(config)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(0, 21, 2):
      f.write(json.dumps({"step": step, "split": "train", "loss": 4.0 - step * 0.05,
                          "learning_rate": 5e-5, "tokens_per_s": 3.7e5}) + "\n")
    for step in (10, 20):
      f.write(json.dumps({"step": step, "split": "validation", "loss": math.log(res["perplexity"]
                          ["validation"]) + (20 - step) * 0.01}) + "\n")
    f.write('{"step": 21, "split": "tra')  # a line cut by a kill must not break the report
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(res, f)
  return res


# ----------------------------------------------------------------------------------------------
# Spec parsing
# ----------------------------------------------------------------------------------------------


def test_tuple_spec_is_a_product_and_flags_cross():
  config = base_config()
  runs = sweep.expand_sweep(config, ["prune.ratios=0,0.3,0.6:0,0.3,0.6:0,0.3,0.6"], None)
  assert len(runs) == 27
  assert runs[0] == {"prune.ratios": (0.0, 0.0, 0.0)}
  assert runs[1] == {"prune.ratios": (0.0, 0.0, 0.3)}
  assert all(isinstance(x, float) for r in runs for x in r["prune.ratios"])
  both = sweep.expand_sweep(config, ["prune.ratios=0,0.5:0:0,0.5", "seed=0,1"], None)
  assert len(both) == 8 and both[1] == {"prune.ratios": (0.0, 0.0, 0.0), "seed": 1}
  alts = sweep.expand_sweep(config, ["prune.ratios=.1:.2:.3|.1:.18:.32"], None)
  assert [r["prune.ratios"] for r in alts] == [(0.1, 0.2, 0.3), (0.1, 0.18, 0.32)]


def test_values_take_the_type_of_the_config_key():
  config = base_config()
  runs = sweep.expand_sweep(config, ["train.steps=10,2e1", "export.hf=true,0",
                                     "prune.target=1", "model.name_or_path=gpt2,gpt2-medium"],
                            None)
  assert len(runs) == 8
  assert {type(r["train.steps"]) for r in runs} == {int}
  assert {r["train.steps"] for r in runs} == {10, 20}
  assert {r["export.hf"] for r in runs} == {True, False}
  assert runs[0]["prune.target"] == 1.0 and isinstance(runs[0]["prune.target"], float)
  (splits,) = sweep.expand_sweep(config, ["eval.splits=validation:test"], None)
  assert splits["eval.splits"] == ("validation", "test")
  with pytest.raises(UserError, match=r"'1\.5'.*train\.steps"):
    sweep.expand_sweep(config, ["train.steps=1.5"], None)
  with pytest.raises(UserError, match="export.hf"):
    sweep.expand_sweep(config, ["export.hf=maybe"], None)


def test_unknown_key_names_the_key_and_a_near_miss():
  config = base_config()
  with pytest.raises(UserError, match=r"unknown config key 'prune\.ratio'.*prune\.ratios"):
    sweep.expand_sweep(config, ["prune.ratio=0.1"], None)
  with pytest.raises(UserError, match="'nothing.here'"):
    config_lib.apply_overrides(config, {"nothing.here": 1})
  with pytest.raises(UserError, match="KEY=VALUES"):
    sweep.expand_sweep(config, ["seed"], None)


def test_apply_overrides_copies_checks_and_locks():
  config = base_config()
  new = config_lib.apply_overrides(config, {"prune.ratios": [0, 0.5, 0.9], "seed": 3.0,
                                       "config.train.steps": "7"})
  assert new.prune.ratios == (0.0, 0.5, 0.9) and new.seed == 3 and new.train.steps == 7
  assert config.prune.ratios == () and config.seed == 0
  with pytest.raises(AttributeError):
    new.brand_new_key = 1  # locked again
  with pytest.raises(UserError, match="seed"):
    config_lib.apply_overrides(config, {"seed": "x"})
  with pytest.raises(UserError, match="model.n_layer"):
    config_lib.apply_overrides(config, {"model.n_layer": 2.5})


def test_run_names_are_readable_safe_and_unique():
  assert sweep.run_name({"prune.ratios": (0.0, 0.3, 0.6), "seed": 1}) == \
      "prune.ratios=0.0,0.3,0.6__seed=1"
  assert sweep.run_name({}) == "default"
  odd = sweep.run_name({"model.name_or_path": "/data/my model"})
  assert "/" not in odd and " " not in odd
  long = sweep.run_name({"prune.ratios": tuple(i / 100 for i in range(60))})
  assert len(long) <= sweep.MAX_NAME_LEN
  other = sweep.run_name({"prune.ratios": tuple(i / 100 for i in range(61))})
  assert long != other


def test_get_sweep_from_a_config_file(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent("""
      import ml_collections

      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.prune = ml_collections.ConfigDict(dict(ratios=(0.0, 0.0, 0.0), target=0.5))
        return c

      def get_sweep(arg=None):
        seeds = range(3) if arg == "seeds" else [0]
        return [{"prune.ratios": r, "seed": s}
                for r in [(0.1, 0.2, 0.3), (0.1, 0.18, 0.32)] for s in seeds]
      """))
  spec = importlib.util.spec_from_file_location("cfgmod", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert len(sweep.load_get_sweep(str(path))) == 2
  listed = sweep.load_get_sweep(f"{path}:seeds")
  runs = sweep.expand_sweep(config, [], listed)
  assert len(runs) == 6 and runs[1] == {"prune.ratios": (0.1, 0.2, 0.3), "seed": 1}
  flags_win = sweep.expand_sweep(config, ["seed=5"], listed)
  assert flags_win == [{"seed": 5}]
  assert sweep.expand_sweep(config, [], None) == [{}]
  assert sweep.load_get_sweep(os.path.join(ROOT, "configs/base.py")) is None


# ----------------------------------------------------------------------------------------------
# A sweep killed on its 3rd run, resumed, and reported
# ----------------------------------------------------------------------------------------------


def test_killed_sweep_resumes_and_reports_every_run(tmp_path):
  config = base_config()
  workdir = str(tmp_path / "grid")
  runs = sweep.expand_sweep(config, ["prune.ratios=0,0.3,0.6:0,0.5:0,0.3,0.6"], None)
  assert len(runs) == 18
  calls, base_dirs = [], []

  def killed_on_third(cfg, run_dir):
    calls.append(run_dir)
    base_dirs.append(cfg.base.dir)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return fake_run(cfg, run_dir)

  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(config, workdir, runs, run_fn=killed_on_third)
  status = json.load(open(os.path.join(workdir, "sweep.json")))
  assert [r["status"] for r in status["runs"][:4]] == ["done", "done", "interrupted", "pending"]
  assert set(base_dirs) == {os.path.join(os.path.abspath(workdir), "base")}

  calls.clear()
  rows = sweep.run_sweep(config, workdir, runs, run_fn=lambda c, d: (calls.append(d),
                                                                     fake_run(c, d)))
  assert len(calls) == 16  # the two finished runs were skipped
  assert os.path.basename(calls[0]) == sweep.run_name(runs[2])
  assert all(r["status"] == "done" for r in rows)
  assert sum(bool(r.get("reused")) for r in rows) == 2
  first = os.path.join(workdir, "prune.ratios=0.0,0.0,0.0")
  assert json.load(open(os.path.join(first, "overrides.json"))) == {"prune.ratios": [0, 0, 0]}

  # run_sweep wrote the report: every run, numbers as in results.json.
  with open(os.path.join(workdir, "report.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 18
  by_run = {r["run"]: r for r in table}
  row = by_run["prune.ratios=0.6,0.5,0.3"]
  want = fake_ppl(config_lib.apply_overrides(config, {"prune.ratios": (0.6, 0.5, 0.3)}))
  assert float(row["ppl_validation"]) == pytest.approx(want)
  assert row["ratios_per_block"] == "0.6/0.5/0.3"
  assert float(row["sparsity_overall"]) == pytest.approx((0.6 + 0.5 + 0.3) / 3)
  assert row["sparsity_per_block"] == "0.6/0.5/0.3"
  assert row["method"] == "magnitude" and row["allocation"] == "explicit"
  assert row["target"] == ""  # explicit ratios: the config's target was not used
  md = open(os.path.join(workdir, "report.md")).read()
  assert f"| {want:.2f} |" in md and "| 0.467 |" in md and "0.600/0.500/0.300" in md

  for name in ("ppl_vs_sparsity", "heatmap_mid0", "heatmap_mid0.5", "training_curves"):
    path = os.path.join(workdir, name + ".png")
    assert os.path.getsize(path) > 5000, name
  assert not os.path.exists(os.path.join(workdir, "layer_scan.png"))


def test_report_layer_scan_seeds_base_and_partial_results(tmp_path):
  config = base_config()
  root = tmp_path / "scan"
  dense = config_lib.apply_overrides(config, {"prune.method": "none"})
  fake_run(dense, str(root / "dense"))
  for layer in range(12):
    ratios = tuple(0.8 if i == layer else 0.0 for i in range(12))
    cfg = config_lib.apply_overrides(config, {"prune.allocation": "layer", "prune.ratios": ratios})
    fake_run(cfg, str(root / f"layer{layer}"))
  for seed in range(3):
    cfg = config_lib.apply_overrides(config, {"prune.ratios": (0.1, 0.2, 0.3), "seed": seed})
    fake_run(cfg, str(root / f"ramp_seed{seed}"))
  cfg = config_lib.apply_overrides(config, {"prune.method": "none", "prune.allocation": "uniform"})
  base = fake_results(cfg)
  base["role"] = "base"
  os.makedirs(root / "base")
  json.dump(base, open(root / "base" / "results.json", "w"))
  os.makedirs(root / "partial")
  json.dump({"perplexity": {"validation": 99.5}}, open(root / "partial" / "results.json", "w"))
  os.makedirs(root / "broken")
  (root / "broken" / "results.json").write_text("{not json")

  written = report.write_report(str(root))
  assert os.path.getsize(written["layer_scan"]) > 5000
  assert os.path.getsize(written["ppl_vs_sparsity"]) > 5000
  assert not any(k.startswith("heatmap") for k in written)  # no 3-block grid here
  rows = report.collect([str(root)])
  assert len(rows) == 12 + 1 + 3 + 1 + 1  # broken JSON skipped
  assert {r["run"]: r["role"] for r in rows}["base"] == "base"
  partial = next(r for r in rows if r["run"] == "partial")
  assert partial["ppl_validation"] == 99.5 and partial["sparsity_overall"] is None
  md = open(written["md"]).read()
  assert "Mean ± std over seeds" in md
  ppls = [20 + 30 * .01 + 10 * .04 + 4 * .09 + 0.1 * s for s in range(3)]
  mean = sum(ppls) / 3
  std = math.sqrt(sum((p - mean) ** 2 for p in ppls) / 2)
  assert f"{mean:.2f} ± {std:.2f}" in md
  seeds = list(csv.DictReader(open(written["seeds_csv"])))
  assert len(seeds) == 1 and seeds[0]["n"] == "3"
  assert "| partial |" in md and "| 99.50 |" in md


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
  """`python -m blockprune_jax.sweep` with get_sweep and --config overrides, then the report CLI."""
  cfg_path = tmp_path / "cfg.py"
  cfg_path.write_text(textwrap.dedent(f"""
      import importlib.util
      spec = importlib.util.spec_from_file_location("b", {os.path.join(ROOT, "configs/base.py")!r})
      base = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(base)

      def get_config(arg=None):
        c = base.get_config()
        c.prune.method = "magnitude"
        c.prune.allocation = "explicit"
        c.prune.ratios = (0.0, 0.0, 0.0)
        return c

      def get_sweep(arg=None):
        return [{{"prune.ratios": r}} for r in [(0.1, 0.2, 0.3), (0.1, 0.18, 0.32)]]
      """))
  fake = textwrap.dedent(f"""
      import sys, types
      sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
      import test_sweep_report as t
      fake = types.ModuleType("blockprune_jax.pipeline")
      fake.run = lambda config, workdir, **kw: (print("RUN", workdir, config.train.steps,
                                                 config.base.dir), t.fake_run(config, workdir))
      sys.modules["blockprune_jax.pipeline"] = fake
      from absl import app
      from blockprune_jax import sweep
      sweep._define_flags()
      app.run(sweep.main)
      """)
  workdir = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", fake, f"--config={cfg_path}",
                         f"--workdir={workdir}", "--config.train.steps=7"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.count("RUN") == 3  # the two pruned runs and their dense control
  assert os.path.exists(workdir / "prune.method=none__role=control" / "results.json")
  assert f" 7 {workdir}/base" in proc.stdout
  assert os.path.exists(workdir / "prune.ratios=0.1,0.18,0.32" / "results.json")
  proc = subprocess.run([sys.executable, "-m", "blockprune_jax.report", str(workdir)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "| prune.ratios=0.1,0.18,0.32 |" in proc.stdout
  bad = subprocess.run([sys.executable, "-c", fake, f"--config={cfg_path}",
                        f"--workdir={workdir}", "--sweep=prune.ratio=0.1"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert bad.returncode == 2
  assert "unknown config key 'prune.ratio'" in bad.stderr.strip().splitlines()[-1]


def test_a_finetuned_pruning_study_gets_its_dense_controls():
  config = config_lib.apply_overrides(base_config(), {"train.steps": 10})
  runs = [{"prune.ratios": r, "seed": s} for r in [(0.1, 0.2, 0.3), (0.3, 0.2, 0.1)]
          for s in (0, 1)]
  got = sweep.with_controls(config, runs)
  assert got[:2] == [{"seed": 0, "prune.method": "none", "role": "control"},
                     {"seed": 1, "prune.method": "none", "role": "control"}]
  assert got[2:] == runs
  # Already there (a dense run of that setting), switched off, or nothing fine-tuned: none added.
  dense = [{"seed": 0, "prune.method": "none"}]
  assert sweep.with_controls(config, dense + runs[:1]) == dense + runs[:1]
  off = config_lib.apply_overrides(config, {"sweep.controls": False})
  assert sweep.with_controls(off, runs) == runs
  assert sweep.with_controls(base_config(), runs) == runs


# ----------------------------------------------------------------------------------------------
# Failed runs in the report, and the console's answer
# ----------------------------------------------------------------------------------------------


def test_the_report_names_every_failed_run_and_why(tmp_path, capsys):
  config = config_lib.apply_overrides(base_config(), {"train.steps": 10})
  runs = sweep.expand_sweep(config, ["prune.ratios=.1:.2:.3|.3:.2:.1", "seed=0,1"], None)

  def one_diverges(cfg, run_dir):
    if tuple(cfg.prune.ratios) == (0.3, 0.2, 0.1) and cfg.seed == 1:
      raise FloatingPointError("non-finite loss at step 3\nmore detail")
    return fake_run(cfg, run_dir)

  rows = sweep.run_sweep(config, str(tmp_path), runs, run_fn=one_diverges)
  assert [r["status"] for r in rows].count("failed") == 1
  bad = sweep.run_name(runs[3])
  md = open(tmp_path / "report.md", encoding="utf-8").read()
  assert "\n5 runs (1 more failed: see Failed runs). " in md
  assert f"## Failed runs\n\nThese runs have no results.json; sweep.json says why:\n\n- {bad}: " \
         "FloatingPointError: non-finite loss at step 3\n" in md
  assert report.failed_runs([str(tmp_path)]) == [
      (bad, "FloatingPointError: non-finite loss at step 3")]
  # The console ends with the answer: means ± std per setting, not the table of every run.
  out = capsys.readouterr().out
  answer = out[out.index("Mean ± std over seeds, per setting:"):]
  assert "| run " not in out and out.endswith(answer)
  lines = [l for l in answer.splitlines() if l.startswith("| prune.")]
  assert len(lines) == 3 and "prune.method=none" in lines[-1]  # the dense control
  assert [l.split("|")[2].strip() for l in lines] == ["2", "1", "2"]  # seeds with a result


@pytest.mark.slow
def test_a_sweep_with_a_diverging_run_reports_it_with_its_reason(tmp_path, capsys):
  """As a user would: a learning-rate sweep without clipping where one rate diverges."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  config = tiny_config(train__steps=4, train__grad_clip=0.0, train__warmup_steps=1)
  runs = sweep.expand_sweep(config, ["train.learning_rate=0.001,10000"], None)
  rows = sweep.run_sweep(config, str(tmp_path), runs)
  assert [r["status"] for r in rows] == ["done", "failed"], rows
  md = open(tmp_path / "report.md", encoding="utf-8").read()
  assert "\n1 runs (1 more failed: see Failed runs). " in md
  assert "\n- train.learning_rate=10000.0: Diverged: non-finite loss at step " in md
  out = capsys.readouterr().out.rstrip()
  assert out.splitlines()[-1].startswith("| (every run) | 1 ")  # the one run with a result
