"""Sharded training state (mesh.fsdp): the layout rule, and the same run whatever the layout."""
import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax import pipeline
from blockprune_jax.prune import pruning
from blockprune_jax import train
from blockprune_jax.errors import UserError
from conftest import REPO, subprocess_env, tiny_config, tiny_training


def test_fsdp_size_resolves_and_refuses_what_does_not_divide():
  assert parallel.fsdp_size(-1, 8) == 8 and parallel.fsdp_size(1, 8) == 1
  assert parallel.fsdp_size(4, 8) == 4
  for bad in (3, 0, 16):
    with pytest.raises(UserError, match=f"mesh.fsdp={bad} must divide the 8 devices"):
      parallel.fsdp_size(bad, 8)


def test_largest_divisible_dimension_of_big_tensors_is_sharded():
  big = parallel.FSDP_MIN_SIZE
  assert parallel.fsdp_spec((50257, 1600), 8) == P(None, "fsdp")  # 50257 is prime-ish
  assert parallel.fsdp_spec((6400, 1600), 8) == P("fsdp")
  assert parallel.fsdp_spec((1600,), 8) == P()  # small: replicated
  assert parallel.fsdp_spec((big + 1, 1), 8) == P()  # nothing divides: replicated
  assert parallel.fsdp_spec((), 8) == P() and parallel.fsdp_spec((6400, 1600), 1) == P()
  mesh = parallel.train_mesh(-1)  # conftest's 4 devices
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4}
  assert dict(parallel.train_mesh(2).shape) == {"data": 2, "fsdp": 2}
  assert parallel.train_mesh(1).axis_names == ("data",)


def test_a_bad_mesh_fsdp_is_one_line(tmp_path):
  with pytest.raises(UserError, match="mesh.fsdp=3 must divide the 4 devices"):
    pipeline.run(tiny_config(mesh__fsdp=3, train__steps=1), str(tmp_path / "bad"))


def _masked_run(mesh, steps=4, scan_layers=False):
  """Masked fine-tuning steps with dropout on: (params on the host, losses)."""
  cfg, t_cfg, opt, lrs = tiny_training(dropout=0.1, learning_rate=1e-3)
  cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
  params = model_lib.init_params(cfg, 1)
  masks = pruning.compute_masks(params, [0.5, 0.5], method="magnitude", targets="mlp",
                                scope="matrix", blocks=2)
  state = parallel.place_state(train.init_state(params, opt, masks, seed=0), mesh,
                               donatable=True)
  step = train.make_train_step(cfg, train.optimizer_settings(t_cfg), mesh)
  data = np.random.RandomState(0).randint(0, 257, (steps, 2, 8, 17)).astype(np.int32)
  losses = []
  for s in range(steps):
    state, m = step(state, parallel.shard_batch(data[s], mesh, axis=1), {}, lrs[s])
    losses.append(float(m["loss"]))
  kernel = state["params"]["h_0"]["mlp"]["c_fc"]["kernel"]
  return jax.device_get(parallel.gather(state, mesh)), losses, kernel.sharding.spec


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_sharded_step_equals_replicated(monkeypatch, scan_layers):
  """Also with the blocks scanned, where each block's weights are gathered inside the scan."""
  monkeypatch.setattr(parallel, "FSDP_MIN_SIZE", 256)  # shard the tiny matrices too
  want, l_want, spec = _masked_run(parallel.train_mesh(1), scan_layers=scan_layers)
  assert spec == P()
  for fsdp in (2, 4):
    got, l_got, spec = _masked_run(parallel.train_mesh(fsdp), scan_layers=scan_layers)
    assert spec == P(None, "fsdp")  # the state really is sharded
    np.testing.assert_allclose(l_got, l_want, rtol=1e-6)
    for tree in ("params", "masks", "opt_state"):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), want[tree],
                   got[tree])
    # Pruned weights stay exactly zero in the sharded layout too.
    w = got["params"]["h_1"]["mlp"]["c_proj"]["kernel"]
    kept = got["masks"]["h_1"]["mlp"]["c_proj"]["kernel"]
    assert np.all(w[~kept] == 0) and np.mean(kept) == 0.5


@pytest.mark.slow
def test_eight_devices_fsdp_equals_replicated_and_resumes_across_layouts(tmp_path):
  """tests/fsdp_runs.py on 8 fake devices: whole masked fine-tuning runs through the pipeline."""
  env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "tests/fsdp_runs.py", str(tmp_path)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["resumed"] == [True, True, True]
  assert r["ppl_rel_8_vs_1"] < 1e-5
  assert r["params_8_vs_1"] < 1e-5
  assert r["params_8_to_1_vs_1"] < 1e-5 and r["params_1_to_8_vs_8"] < 1e-5
  assert r["params_8_to_8_vs_8"] == 0.0  # the same layout resumes bitwise, as replicated does
  assert abs(r["sparsity"] - 0.5) < 1e-3


@pytest.mark.slow
def test_scanned_blocks_train_as_unrolled_through_the_pipeline(tmp_path):
  """model.scan_layers with sharded state: without dropout, the same run as unrolled."""
  results = {}
  for scan in (False, True):
    config = tiny_config(train__steps=3, model__dropout=0.0, prune__method="magnitude",
                         prune__target=0.5, mesh__fsdp=4, model__scan_layers=scan)
    results[scan] = pipeline.run(config, str(tmp_path / f"scan_{scan}"))
  ppl = [results[s]["perplexity"]["validation"] for s in (False, True)]
  assert abs(ppl[1] - ppl[0]) <= 1e-5 * ppl[0]
  assert results[True]["sparsity"]["overall"] == results[False]["sparsity"]["overall"]
