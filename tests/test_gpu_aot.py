"""bench aot for GPU targets and model.attention=auto's choice by the platform compiled for.

The compiles for an H100 run in their own environment, with JAX's CUDA plugin and cuDNN
(requirements-gpu-aot.txt; .ci/run makes .venv-gpu): on a host without a GPU driver the plugin
logs CUDA warnings in every run, so the main environment goes without it."""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

from blockprune_jax import model as model_lib
from blockprune_jax.bench import aot as bench_aot
from blockprune_jax.errors import UserError
from conftest import REPO, subprocess_env

GPU_PYTHON = os.environ.get("BLOCKPRUNE_GPU_PYTHON",
                            os.path.join(REPO, ".venv-gpu", "bin", "python"))
needs_gpu_env = pytest.mark.skipif(
    not os.path.exists(GPU_PYTHON) and "BLOCKPRUNE_GPU_PYTHON" not in os.environ,
    reason=f"no {GPU_PYTHON}: python -m venv .venv-gpu && .venv-gpu/bin/pip install "
           "-r requirements.txt -r requirements-gpu-aot.txt -e . (as .ci/run does)")


def _gpu_python(*args):
  return subprocess.run([GPU_PYTHON, *args], env=subprocess_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=900)


def test_attention_auto_is_chosen_by_the_platform_compiled_for(monkeypatch):
  # cuDNN's kernel stands in as sin, XLA's as cos: the program shows which one it took.
  monkeypatch.setattr(model_lib, "_dot_attention",
                      lambda q, k, v, impl: jnp.sin(q) if impl == "cudnn" else jnp.cos(q))
  cfg = model_lib.preset("tiny", dtype="bfloat16")
  q = jnp.ones((2, 8, 2, 32), jnp.bfloat16)
  step = jax.jit(lambda q: model_lib.attention(q, q, q, cfg))

  def program(platform):
    return jax.export.export(step, platforms=[platform])(q).mlir_module()
  sin, cos = "stablehlo.sine", "stablehlo.cosine"
  assert sin in program("cuda") and cos not in program("cuda")
  assert cos in program("cpu") and sin not in program("cpu")
  assert sin not in program("tpu")
  f32 = jax.jit(lambda q: model_lib.attention(q, q, q, model_lib.preset("tiny")))
  assert sin not in jax.export.export(f32, platforms=["cuda"])(q.astype(jnp.float32)
                                                               ).mlir_module()


def test_unknown_gpu_is_one_line_naming_the_known_ones():
  with pytest.raises(UserError, match=r"'l40:2' is no GPU target \(kind:count, kinds: a100-40, "
                     r"a100-80, h100, h100-pcie, h200\)"):
    bench_aot.gpu_devices("l40:2")


def test_without_the_cuda_plugin_one_line_says_how_to_get_it(monkeypatch):
  monkeypatch.setattr(model_lib, "cuda_plugin_installed", lambda: False)
  with pytest.raises(UserError, match=rf'pip install "jax\[cuda12\]=={jax.__version__}"'):
    bench_aot.gpu_devices("h100:1")


@pytest.mark.slow
@needs_gpu_env
def test_tiny_preset_compiles_for_an_h100_with_fused_attention(tmp_path):
  out = _gpu_python("-m", "blockprune_jax.bench", "aot", "--topology=h100:1", "--preset=tiny",
                    "--seq_len=64", "--batch=2", "--dtype=bfloat16", "--remat=block")
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in out.stdout.splitlines()]
  assert [l["step"] for l in lines] == ["train", "eval"]
  for r in lines:  # model.attention=auto, compiled on this CPU host for an H100
    assert r["platform"] == "cuda" and r["fused_attention"] is True
    assert r["gpu_kind"] == "NVIDIA H100 80GB HBM3" and r["fits"]
    assert r["hbm_bytes"] == int(84942979072 * 0.75)  # JAX's default share of its memory
  assert "tiny train on h100:1: needs" in out.stderr
  # A target config with a field the installed jaxlib does not know: one line, no traceback.
  spec = open(os.path.join(bench_aot.GPU_TARGETS, "h100.txtpb"), encoding="utf-8").read()
  (tmp_path / "new.txtpb").write_text(spec.replace("gpu_device_info {", "gpu_device_info {\n"
                                                   "  collective_memory_granularity: 2097152"))
  out = _gpu_python("-c", "from blockprune_jax.bench import aot; "
                    f"aot.GPU_TARGETS = {str(tmp_path)!r}; aot.gpu_devices('new:1')")
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert "new.txtpb: jaxlib" in last and "cannot read this GPU target" in last
  assert "Failed to parse GpuTargetConfigProto" in last and "a field newer than" in last
