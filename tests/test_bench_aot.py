"""bench aot: the real train and eval steps compiled for a TPU slice on this CPU host."""
import dataclasses
import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from blockprune_jax.bench import aot as bench_aot
from blockprune_jax.errors import UserError
from conftest import REPO, subprocess_env

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed: pip install -r requirements-aot.txt")


def _bench(*flags):
  return subprocess.run([sys.executable, "-m", "blockprune_jax.bench", "aot", *flags],
                        env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
@needs_libtpu
def test_tiny_preset_compiles_for_a_v5e_slice():
  out = _bench("--topology=v5e:2x2", "--preset=tiny", "--seq_len=64", "--batch=8",
               "--dtype=bfloat16", "--fsdp=4", "--remat=block")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in out.stdout.splitlines()]  # JSON lines only
  assert [l["step"] for l in lines] == ["train", "eval"]
  train, evaluation = lines
  assert train["chips"] == 4 and train["per_chip_batch"] == 2 and train["fsdp"] == 4
  assert train["hbm_bytes"] == int(15.75 * 2**30)  # a v5e chip, as its compiler reports it
  for r in lines:
    assert r["fits"] and 0 < r["total_bytes"] < r["hbm_bytes"]
    assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                - r["alias_bytes"])
  assert train["alias_bytes"] > 0  # the donated state is updated in place
  assert "tiny train on v5e:2x2: needs" in out.stderr and "per chip" in out.stderr


@needs_libtpu
def test_unknown_topology_is_one_line():
  out = _bench("--topology=v9:2x2", "--preset=tiny")
  assert out.returncode != 0 and not out.stdout.strip()
  assert "--topology='v9:2x2' is no TPU slice JAX knows" in out.stderr
  assert "Traceback" not in out.stderr


@needs_libtpu
def test_a_program_too_big_for_the_chip_is_a_result():
  devices = bench_aot.tpu_devices("v5e:2x2")
  mesh = Mesh(devices, ("data",))
  hbm = bench_aot.available_hbm(mesh)
  big = jax.ShapeDtypeStruct((4, 2**34 // 4), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  r = bench_aot.compile_memory(jax.jit(lambda x: jnp.concatenate([x, x * 2])), (big,), hbm)
  assert not r["fits"] and r["total_bytes"] > hbm and "RESOURCE_EXHAUSTED" in r["error"]
  line = bench_aot.human_line({**r, "preset": "x", "step": "train", "topology": "v5e:2x2",
                               "per_chip_batch": 1, "fsdp": 1, "remat": "none"})
  assert line.endswith(": does not fit") and "of 15.75 GiB per chip" in line


def test_without_libtpu_one_line_says_how_to_get_it(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(UserError, match=rf'pip install "jax\[tpu\]=={jax.__version__}"'):
    bench_aot.tpu_devices("v5e:2x2")


def test_out_of_memory_messages_are_read():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (44.63G) exceeds available HBM (15.75G).")
  assert bench_aot._needed_bytes(msg) == int(44.63 * 2**30)  # pylint: disable=protected-access
  assert bench_aot._needed_bytes("no sizes here") is None  # pylint: disable=protected-access


@pytest.mark.slow
@needs_libtpu
def test_largest_batch_gallops_to_the_last_power_of_two_that_fits():
  s = bench_aot.prepare(topology="v5e:2x2", preset="tiny", seq_len=64, dtype="bfloat16",
                        fsdp=1, remat="none")
  need = {b: bench_aot.compile_step(s, "eval", 4 * b)["total_bytes"] for b in (2, 4)}
  assert need[2] < need[4]  # more sequences per chip need more memory
  # A chip that holds 2 sequences per chip but not 4, searched from above.
  small = dataclasses.replace(s, hbm=(need[2] + need[4]) // 2)
  seen = []
  b, record = bench_aot.largest_batch(small, "eval", guess=8, cap=8, emit=seen.append)
  assert b == 2 and record["per_chip_batch"] == 2 and record["fits"]
  assert [(r["per_chip_batch"], r["fits"]) for r in seen] == [(8, False), (4, False), (2, True)]
  assert bench_aot.largest_batch(dataclasses.replace(s, hbm=1), "eval", guess=2, cap=8)[0] == 0
  table = bench_aot.fit_table(presets=["tiny"], topologies=["v5e:2x2"], cap=2, seq_len=64,
                              dtype="bfloat16", fsdp=-1, remat="block", scan_layers=True)
  header, _, row = table.splitlines()
  assert header == "| model | v5e:2x2 train | v5e:2x2 eval |"
  assert row.startswith("| tiny | ≥ 2 (") and row.count("GiB") == 2
