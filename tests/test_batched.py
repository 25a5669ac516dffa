"""Runs side by side (sweep.batch_runs): the same results as one after another, per-run
workdirs, a killed batched sweep resumes, runs that cannot share a program go alone."""
import json
import os
import shutil

import numpy as np
import pytest

from blockprune_jax import batched
from blockprune_jax import sweep
import cli
from conftest import tiny_config

# Three runs that differ in what the program takes as input: masks (one dense), allocation,
# target and seed (data order, dropout).
RUNS = [{"prune.method": "magnitude", "prune.target": 0.3},
        {"prune.method": "magnitude", "prune.target": 0.6, "prune.allocation": "linear",
         "seed": 1},
        {"prune.method": "none"}]


def _results(workdir):
  return json.load(open(os.path.join(workdir, "results.json")))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """The three runs one after another, and side by side both ways (4 devices, dropout on)."""
  config = tiny_config(train__steps=6, model__dropout=0.1, export__hf=True,
                       sweep__controls=False, train__eval_every=3)
  out = {}
  for k, mode in ((1, "auto"), (3, "vmap"), (3, "map")):
    d = str(tmp_path_factory.mktemp(f"batch_runs_{k}_{mode}"))
    c = config.copy_and_resolve_references()
    c.sweep.batch_runs, c.sweep.side_by_side = k, mode
    rows = sweep.run_sweep(c, d, RUNS, report=False)
    assert [r["status"] for r in rows] == ["done"] * 3, rows
    out[mode if k > 1 else 1] = rows
  return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_side_by_side_gives_the_results_of_one_after_another(both, mode):
  for one, side in zip(both[1], both[mode]):
    a, b = _results(one["workdir"]), _results(side["workdir"])
    assert "batch" not in a["runtime"]
    assert b["runtime"]["batch"]["runs"] == 3 and b["runtime"]["batch"]["mode"] == mode
    for split, ppl in a["perplexity"].items():
      assert b["perplexity"][split] == pytest.approx(ppl, rel=1e-5)
    if "oneshot" in a:
      assert b["oneshot"]["perplexity"] == pytest.approx(a["oneshot"]["perplexity"], rel=1e-6)
    assert b["sparsity"] == a["sparsity"]  # the same masks, exactly
    assert b["train"]["final_loss"] == pytest.approx(a["train"]["final_loss"], rel=1e-5)
    assert a["train"]["best_validation_perplexity"] is not None  # the periodic validation ran
    assert b["train"]["best_validation_perplexity"] == pytest.approx(
        a["train"]["best_validation_perplexity"], rel=1e-5)
    pa, pb = cli.exported_params(one["workdir"]), cli.exported_params(side["workdir"])
    assert pa.keys() == pb.keys()
    for name in pa:
      np.testing.assert_allclose(pb[name], pa[name], atol=2e-5, err_msg=name)
      np.testing.assert_array_equal(pb[name] == 0, pa[name] == 0, err_msg=name)
    # Each run keeps its own metrics, one line per step.
    steps = [json.loads(l)["step"] for l in open(os.path.join(side["workdir"], "metrics.jsonl"))
             if '"train"' in l]
    assert steps == list(range(1, 7))


@pytest.mark.slow
def test_side_by_side_runs_share_one_compilation_and_their_time(both):
  results = [_results(r["workdir"]) for r in both["vmap"]]
  batch = results[0]["runtime"]["batch"]
  assert batch["names"] == [r["name"] for r in both["vmap"]]
  # The group's programs are counted once (in its first run); the others compile nothing.
  assert [r["runtime"]["compilations"] for r in results[1:]] == [0, 0]
  assert "train_step" in " ".join(results[0]["runtime"]["compiled"])
  # Shares of the group's time: the runs add up to no more than the group plus preparation.
  shared = sum(r["runtime"]["seconds"] - r["pruning"]["seconds"] for r in results)
  assert shared >= batch["seconds"] * 0.99
  assert all(r["train"]["seconds"] < batch["seconds"] / 2 for r in results)


def test_groups_share_shape_and_steps_and_say_why_a_run_goes_alone():
  base = tiny_config(prune__method="magnitude", train__steps=4)

  def cfg(**o):
    c = base.copy_and_resolve_references()
    for k, v in o.items():
      c.update_from_flattened_dict({k.replace("__", "."): v})
    return c
  configs = [cfg(prune__target=0.3), cfg(prune__target=0.5, seed=3),
             cfg(prune__schedule="gradual"), cfg(train__steps=8),
             cfg(prune__method="none", train__learning_rate=1e-4), cfg(prune__target=0.7)]
  groups, why = batched.plan_groups(configs, 3)
  assert groups == [[0, 1, 4], [2], [3], [5]]
  assert "gradual" in why[2]
  assert "train.steps" in why[3]
  assert "full" in why[5]
  assert 0 not in why and 4 not in why
  assert batched.plan_groups(configs[:2], 3) == ([[0, 1]], {})


@pytest.mark.slow
def test_a_run_that_diverges_fails_alone_and_a_longer_run_goes_alone(tmp_path, capsys):
  config = tiny_config(train__steps=4, prune__method="magnitude", sweep__controls=False,
                       sweep__batch_runs=2, train__grad_clip=0.0)
  rows = sweep.run_sweep(config, str(tmp_path), [{"train.learning_rate": 3e-3},
                                                 {"train.learning_rate": 1e38},
                                                 {"train.steps": 2}], report=False)
  assert [r["status"] for r in rows] == ["done", "failed", "done"], rows
  assert "non-finite loss" in rows[1]["error"]
  assert not os.path.exists(os.path.join(rows[1]["workdir"], "results.json"))
  err = capsys.readouterr().err
  assert (f"{rows[2]['name']} runs alone: no other run shares its program (train.steps differ "
          f"from {rows[0]['name']})") in err, err
  assert "batch" not in _results(rows[2]["workdir"])["runtime"]
  assert _results(rows[0]["workdir"])["runtime"]["batch"]["runs"] == 2


# --- a batched sweep killed part-way -------------------------------------------------------

STEPS, EVERY = 40, 4


def _cmd(workdir):
  return cli.command(workdir, "--sweep=prune.target=0.3,0.5,0.7",
                     "--config.prune.method=magnitude", f"--config.train.steps={STEPS}",
                     f"--config.checkpoint.every_steps={EVERY}", "--config.export.hf=true",
                     "--config.model.dropout=0.1", "--config.sweep.controls=false",
                     "--config.sweep.batch_runs=3", module="blockprune_jax.sweep")


@pytest.mark.slow
def test_a_killed_batched_sweep_resumes_and_ends_as_uninterrupted(tmp_path, uninterrupted):
  straight, r = uninterrupted(_cmd)
  assert "3 runs side by side" in r.stderr
  names = sorted(p for p in os.listdir(straight) if p.startswith("prune."))
  assert len(names) == 3

  killed = tmp_path / "killed"
  err = tmp_path / "killed.err"
  proc = cli.start(_cmd(killed), err)
  cli.wait_for(proc, lambda: all(len(cli.checkpoint_steps(killed / n / "checkpoints")) >= 2
                                 for n in names), err, timeout=240)
  cli.stop(proc, timeout=60)  # SIGKILL: nothing more is saved
  assert not any((killed / n / "results.json").exists() for n in names), "killed too late"

  # Every run resumes from its own checkpoint, side by side, and ends bitwise as uninterrupted.
  cli.run(_cmd(killed), timeout=300, check=True)
  for n in names:
    assert cli.events(killed / n, "resume"), n
    cli.assert_same_params(cli.exported_params(straight / n), cli.exported_params(killed / n),
                           f"{n}: ")

  # Checkpoints at different steps (a kill between two runs' saves): one at a time, same end.
  for n in names:
    os.remove(killed / n / "results.json")
  newest = cli.checkpoint_steps(killed / names[0] / "checkpoints")[-1]
  shutil.rmtree(killed / names[0] / "checkpoints" / str(newest))
  cli.run(_cmd(killed), timeout=300, check=True)
  events = [json.loads(l) for l in open(killed / names[1] / "log.jsonl")]
  assert any("one at a time" in e.get("alone", "") for e in events)
  for n in names:
    a, b = cli.exported_params(straight / n), cli.exported_params(killed / n)
    for k in a:
      np.testing.assert_allclose(b[k], a[k], atol=2e-5, err_msg=f"{n}: {k}")
