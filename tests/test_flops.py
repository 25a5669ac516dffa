"""Model FLOPs per token and MFU (flops.py), against a hand count for the tiny model."""
import types

import jax

from blockprune_jax import flops
from blockprune_jax import model as model_lib


def test_mfu_of_a_fake_device_against_a_hand_count(monkeypatch):
  cfg = model_lib.preset("tiny", vocab_size=100, n_positions=64)  # 2 blocks, d = 64
  d = 64
  # Per block: attention 4 d^2 weights + 4 d biases, MLP 8 d^2 + 5 d, two layer norms 4 d.
  n = 2 * (12 * d * d + 13 * d) + 100 * d + 2 * d  # + token table + final layer norm
  assert flops.matmul_params(cfg) == n == 106496
  params = model_lib.init_shapes(cfg)
  assert model_lib.count_params(params) - 64 * d == n  # every parameter but the position table
  per_token = 6 * n + 12 * 2 * d * 32  # seq_len 32
  assert flops.flops_per_token(cfg, 32) == per_token == 688128
  assert flops.flops_per_token(cfg, 32, train=False) == per_token / 3
  monkeypatch.setitem(flops.PEAK_FLOPS, "Fake", 1e9)
  chips = [types.SimpleNamespace(device_kind="Fake chip")] * 2
  assert flops.mfu(cfg, 32, 1000.0, chips) == 1000 * 688128 / 2e9
  assert flops.mfu(cfg, 32, 1000.0, chips, train=False) == 1000 * 688128 / 3 / 2e9
  assert flops.mfu(cfg, 32, 1000.0, jax.devices()) is None  # CPU: no known peak


def test_device_kinds_find_their_peak():
  assert flops.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops_for("NVIDIA H100 PCIe", 8) == 8 * 756e12
  assert flops.peak_flops_for("TPU v5 lite") == 197e12
  assert flops.peak_flops_for("cpu") is None
