"""Compile once per shape: in one process (kept step functions) and across processes (JAX's
persistent compilation cache); results.json counts what each run compiled."""
import json
import os

import pytest

from blockprune_jax import pipeline
import cli
from conftest import tiny_config


def _steps(compiled: dict) -> dict:
  return {k: v for k, v in compiled.items() if "train_step" in k or "eval_step" in k}


@pytest.mark.slow
def test_a_second_run_in_the_process_compiles_no_train_or_eval_step(tmp_path):
  # A shape no other test compiles (seq_len 24), so the first run here really compiles.
  common = dict(train__steps=3, prune__method="magnitude", runtime__compile_cache="off",
                data__seq_len=24)
  first = pipeline.run(tiny_config(prune__target=0.3, **common), str(tmp_path / "a"))
  # Another sparsity, learning rate and seed: all inputs of the compiled steps, not constants.
  second = pipeline.run(tiny_config(prune__target=0.6, train__learning_rate=1e-3, seed=3,
                                    **common), str(tmp_path / "b"))
  assert _steps(first["runtime"]["compiled"]), first["runtime"]  # the count sees them
  assert first["runtime"]["compilations"] > 0 and first["runtime"]["compile_s"] > 0
  assert _steps(second["runtime"]["compiled"]) == {}, second["runtime"]["compiled"]
  assert second["runtime"]["compilations"] < first["runtime"]["compilations"]


@pytest.mark.slow
def test_the_persistent_cache_is_written_by_one_process_and_hit_by_the_next(tmp_path):
  cache = tmp_path / "jax_cache"

  def run(name):
    cli.run(cli.command(tmp_path / name, "--config.train.steps=2",
                        f"--config.runtime.compile_cache={cache}"), check=True)
    return json.load(open(tmp_path / name / "results.json"))["runtime"]
  first = run("one")
  assert _steps(first["compiled"]) and os.listdir(cache)
  second = run("two")
  assert second["compile_cache_hits"] > 0
  assert _steps(second["compiled"]) == {}, second["compiled"]
