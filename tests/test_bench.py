"""The benchmark entry runs and reports what it measured (speed itself is not asserted)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env


@pytest.mark.parametrize("what,last,n", [("train", "train", 1), ("compact", "compact_speedup", 2)])
def test_bench_prints_json_lines(what, last, n):
  out = subprocess.run([sys.executable, "-m", "blockprune_jax.bench", what, "--preset=tiny",
                        "--seq_len=32", "--batch=2", "--steps=1", "--dtype=float32"],
                       env=subprocess_env(), cwd=REPO, check=True, capture_output=True, text=True).stdout
  lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
  assert lines[-1]["bench"] == last
  measured = [l for l in lines if "tokens_per_s" in l]
  assert len(measured) == n and all(l["tokens_per_s"] > 0 for l in measured)
  assert measured[0]["gflop_per_token"] > 0 and measured[0]["backend"] == "cpu"
