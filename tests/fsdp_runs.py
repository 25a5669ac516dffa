"""Runs tests/test_fsdp.py starts in a subprocess with 8 fake CPU devices (argv: workdir root).

Masked fine-tuning of tests/tiny.py (MLP magnitude masks, dropout on) with mesh.fsdp=1 and 8,
straight and interrupted after the step-4 checkpoint then resumed under the other layout (and
under the same one); prints one JSON line of the largest differences against the straight runs.
"""
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_config  # noqa: E402  pylint: disable=wrong-import-position

from blockprune_jax import data as data_lib, parallel, pipeline  # noqa: E402  pylint: disable=wrong-import-position

STEPS, STOP = 8, 6
parallel.FSDP_MIN_SIZE = 256  # tiny.py's matrices are small: shard them all the same


class Stop(Exception):
  pass


def config(fsdp):
  return tiny_config(train__steps=STEPS, model__dropout=0.1, prune__method="magnitude",
                     prune__target=0.5, checkpoint__every_steps=4, export__hf=True,
                     train__learning_rate=1e-3, mesh__fsdp=fsdp)


def run(workdir, fsdp, stop_at=None):
  batch_at = data_lib.step_batch

  def stopping(sequences, step, *args):
    if step == stop_at:
      raise Stop()
    return batch_at(sequences, step, *args)
  data_lib.step_batch = stopping
  try:
    return pipeline.run(config(fsdp), workdir)
  except Stop:
    return None
  finally:
    data_lib.step_batch = batch_at


def params(workdir):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def diff(a, b):
  return max(float(np.max(np.abs(params(a)[k] - params(b)[k]))) for k in params(a))


def main(root):
  assert jax.device_count() == 8
  out = {}
  d = {name: os.path.join(root, name) for name in ("r1", "r8", "r8_to_1", "r1_to_8", "r8_to_8")}
  results = {"r1": run(d["r1"], 1), "r8": run(d["r8"], 8)}
  for name, first, then in (("r8_to_1", 8, 1), ("r1_to_8", 1, 8), ("r8_to_8", 8, 8)):
    assert run(d[name], first, stop_at=STOP) is None
    results[name] = run(d[name], then)
  ppl = {k: r["perplexity"]["validation"] for k, r in results.items()}
  out["ppl_rel_8_vs_1"] = abs(ppl["r8"] - ppl["r1"]) / ppl["r1"]
  out["params_8_vs_1"] = diff(d["r8"], d["r1"])
  out["params_8_to_1_vs_1"] = diff(d["r8_to_1"], d["r1"])
  out["params_1_to_8_vs_8"] = diff(d["r1_to_8"], d["r8"])
  out["params_8_to_8_vs_8"] = diff(d["r8_to_8"], d["r8"])
  out["sparsity"] = results["r8"]["sparsity"]["overall"]
  out["resumed"] = ["resume" in open(os.path.join(d[n], "log.jsonl")).read()
                    for n in ("r8_to_1", "r1_to_8", "r8_to_8")]
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
