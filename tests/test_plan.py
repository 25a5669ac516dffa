"""The pruning plan: computed by plan.compute on its own, or built from values; the no-op plan."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from blockprune_jax import model as model_lib
from blockprune_jax.prune import allocation
from blockprune_jax.prune import plan as plan_lib
from conftest import tiny_config


class _Log:
  def __init__(self):
    self.events = []

  def event(self, kind, message="", **fields):
    self.events.append((kind, fields))


def _model(config):
  m = config.model
  cfg = model_lib.GPT2Config(vocab_size=256, n_layer=m.n_layer, n_embd=m.n_embd, n_head=m.n_head,
                             n_positions=m.n_positions)
  return cfg, model_lib.init_params(cfg, 0)


def test_compute_alone_and_a_plan_from_values_prune_alike():
  config = tiny_config(prune__method="magnitude", prune__target=0.5,
                       prune__allocation="linear")
  model_cfg, params = _model(config)
  log = _Log()
  plan = plan_lib.compute(config, model_cfg, params, streams=None, log=log)
  assert [k for k, _ in log.events] == ["plan"]  # computing logs once; building logs nothing
  assert plan.active and plan.ratios_per_layer[0] < plan.ratios_per_layer[-1]  # linear
  assert abs(plan.target - 0.5) < 1e-6
  # The same values, given: no calibration, no allocation, the same masks.
  given = plan_lib.Plan(p=config.prune, model_cfg=model_cfg, block_layers=plan.block_layers,
                        ratios_per_block=plan.ratios_per_block,
                        ratios_per_layer=plan.ratios_per_layer, sizes=plan.sizes,
                        criterion=plan.criterion, key=plan.key)
  _, computed = plan.prune(params, plan.ratios_per_layer)
  _, built = given.prune(params, given.ratios_per_layer)
  assert jax.tree.structure(computed) == jax.tree.structure(built)
  for x, y in zip(jax.tree.leaves(computed), jax.tree.leaves(built)):
    np.testing.assert_array_equal(x, y)
  assert 0.3 < 1 - np.mean([np.mean(x) for x in jax.tree.leaves(built)]) < 0.7
  assert given.describe() == plan.describe()
  assert not plan.gmp_update(0, 10)  # one-shot: masks never change while training
  gradual = dataclasses.replace(plan, p=tiny_config(prune__method="magnitude",
                                                    prune__schedule="gradual").prune)
  assert gradual.gradual and gradual.gmp_update(0, 10)


def test_the_no_op_plan_prunes_nothing_and_reports_zeros():
  config = tiny_config()  # prune.method=none
  model_cfg, params = _model(config)
  log = _Log()
  plan = plan_lib.compute(config, model_cfg, params, streams=None, log=log)
  assert isinstance(plan, plan_lib.Plan) and not plan.active and not log.events
  out, masks = plan.prune(params, plan.ratios_per_layer)
  assert out is params and masks == {}
  assert not plan.gradual and not plan.gmp_update(0, 10) and plan.target == 0.0
  d = plan.describe()
  assert d["method"] == "none" and d["ratios_per_block"] == [0.0, 0.0]
  assert plan_lib.measure(params, model_cfg, plan)["overall"] == 0.0


@pytest.mark.slow
def test_a_resumed_run_reuses_the_measured_allocation_of_its_checkpoint(tmp_path, monkeypatch):
  from blockprune_jax import pipeline  # pylint: disable=import-outside-toplevel
  config = tiny_config(prune__method="magnitude", prune__target=0.5, prune__blocks=2,
                       prune__allocation="sensitivity", prune__sensitivity_rounds=2,
                       prune__calib_batches=2, train__steps=4, checkpoint__every_steps=2)
  first = pipeline.run(config, str(tmp_path), echo=False)
  os.remove(tmp_path / "results.json")  # as if killed after its last checkpoint

  def measure_again(*args, **kwargs):
    raise AssertionError("the resumed run measured its allocation again")
  monkeypatch.setitem(allocation.ALLOCATIONS, "sensitivity", dataclasses.replace(
      allocation.ALLOCATIONS["sensitivity"], ratios=measure_again))
  again = pipeline.run(config, str(tmp_path), echo=False)
  assert again["pruning"]["ratios_per_block"] == first["pruning"]["ratios_per_block"]
  assert again["pruning"]["sensitivity"] == first["pruning"]["sensitivity"]
  assert again["perplexity"] == first["perplexity"]
  events = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
  assert [e for e in events if e["event"] == "allocation" and e.get("reused")]


class _Streams:
  """Each split's tokens are its own constant, so a sequence tells where it came from."""

  def get(self, split):
    return np.full(2000, {"train": 1, "validation": 2, "test": 3}[split], np.int32)


@pytest.mark.parametrize("score_split", ["train", "validation"])
def test_allocations_are_scored_on_prune_score_split_and_statistics_on_train(score_split):
  from blockprune_jax.prune import calibration  # pylint: disable=import-outside-toplevel
  config = tiny_config(prune__calib_batches=4, prune__score_split=score_split)
  stats = calibration.calibration_sequences(config, _Streams(), calibration.STATS)
  scored = calibration.calibration_sequences(config, _Streams(), calibration.SCORE,
                                             with_labels=True)
  assert stats.shape == (4, config.data.seq_len) and np.all(stats == 1)
  assert scored.shape == (4, config.data.seq_len + 1)
  assert np.all(scored == {"train": 1, "validation": 2}[score_split])
