"""Allocations measured on the model: sensitivity (solved from per-block loss curves) and search.

One small model is trained for real (4 layers x 128, 600 steps on the builtin corpus); then
each allocation prunes 80 % of its MLP weights, one block per layer, with no fine-tuning, and
is scored on held-out validation text it never saw.
"""
import os

import pytest

from blockprune_jax import pipeline
from conftest import tiny_config

pytestmark = pytest.mark.slow  # a study of four allocations

COMMON = dict(model__n_layer=4, model__n_embd=128, model__n_head=4, model__n_positions=128,
              data__seq_len=64, base__steps=600, base__learning_rate=2e-3, base__batch_size=8,
              eval__max_tokens=20000, prune__method="magnitude", prune__blocks=4,
              prune__target=0.8, prune__calib_batches=16, train__steps=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("measured")


@pytest.fixture(scope="module")
def study(root):
  out = {}
  for allocation in ("uniform", "linear", "exponential", "owl", "sensitivity", "search"):
    config = tiny_config(prune__allocation=allocation, base__dir=str(root / "base"), **COMMON)
    out[allocation] = pipeline.run(config, str(root / allocation))
  return out


def test_sensitivity_beats_the_generated_allocations_on_held_out_text(study):
  ppl = {k: r["perplexity"]["validation"] for k, r in study.items()}
  for other in ("uniform", "linear", "exponential", "owl"):
    assert ppl["sensitivity"] < ppl[other], ppl


def test_measured_allocations_hit_the_budget_and_record_their_curves(study):
  for kind in ("sensitivity", "search"):
    r = study[kind]
    assert abs(r["sparsity"]["overall"] - 0.8) < 1e-3
    assert all(0.0 <= x <= 0.99 for x in r["pruning"]["ratios_per_block"])
  curves = study["sensitivity"]["pruning"]["sensitivity"]
  assert len(curves["loss_increase"]) == 4
  assert all(len(c) == len(curves["grid"]) for c in curves["loss_increase"])
  # Pruning layer 0's MLP hurts more than pruning the last one's, at the highest ratio.
  assert curves["loss_increase"][0][-1] > curves["loss_increase"][-1][-1]
  search = study["search"]["pruning"]["search"]
  assert search["score"] <= min(search["start_scores"].values())



def test_the_report_plots_the_measured_curves(study, root, tmp_path):
  from blockprune_jax import report  # pylint: disable=import-outside-toplevel
  written = report.write_report(str(tmp_path), sources=[str(root)])
  assert os.path.getsize(written["sensitivity"]) > 5000
  assert "sensitivity.png" in open(written["md"]).read()


def test_the_allocation_check_in_miniature(tmp_path):
  """bench_allocation (without its oracle) on one 2-layer model trained for 300 steps: the
  measured allocations beat uniform and match the best generated allocation on held-out test
  text to 0.1 % (README, "Measured allocations")."""
  from blockprune_jax.bench import allocation as bench_allocation  # pylint: disable=import-outside-toplevel
  args = bench_allocation.parse_args(["--steps=300", "--grid_step=0", f"--root={tmp_path}"])
  rec = bench_allocation.run_model("2x64:3", args)
  best_generated = min(rec["ppl"][k] for k in bench_allocation.GENERATED)
  for kind in ("sensitivity", "search"):
    assert rec["ppl"][kind] <= best_generated * 1.001, rec["ppl"]
    assert rec["ppl"][kind] < rec["ppl"]["uniform"], rec["ppl"]
  assert 0 < rec["calib_evals"]["sensitivity"] < rec["calib_evals"]["search"] <= 40 + 64
