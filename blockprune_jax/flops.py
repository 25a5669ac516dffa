"""Model FLOPs per token, and the utilisation (MFU) of a device's peak that a speed makes of them.

PaLM's count (appendix B), as nanoGPT takes it: 6 N + 12 L T d per trained token and a third of
that per evaluated token, N the parameters that take part in matrix multiplies (all but the
position table; the tied LM head counts once). No JAX imported here: bench/torch_ref reads it.
"""

# Dense bf16 peak FLOP/s per chip, from vendor data sheets. The first key a device kind contains
# wins, so "H100 PCIe" comes before "H100" (SXM).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
              "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def peak_flops_for(kind: str, count: int = 1):
  """Peak FLOP/s of `count` chips whose name contains a PEAK_FLOPS key; None if unknown."""
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak * count
  return None


def matmul_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int,
                           train: bool) -> float:
  f = 6 * n_params + 12 * n_layer * n_embd * seq_len
  return f if train else f / 3


def matmul_params(cfg) -> int:
  """N of a model.GPT2Config: per block 2 layer norms, attention c_attn and c_proj, the MLP's
  c_fc and c_proj (its own width where compacted); the token table; the final layer norm."""
  d = cfg.n_embd
  blocks = sum(4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * w + w + d
               for w in map(cfg.mlp_width, range(cfg.n_layer)))
  return blocks + cfg.vocab_size * d + 2 * d


def flops_per_token(cfg, seq_len: int, train: bool = True) -> float:
  return matmul_flops_per_token(matmul_params(cfg), cfg.n_layer, cfg.n_embd, seq_len, train)


def mfu(model_cfg, seq_len: int, tokens_per_s: float, devices, train: bool = True):
  """Model FLOPs per second / the devices' summed peak; None where a device's peak is unknown
  (CPU)."""
  peaks = [peak_flops_for(d.device_kind) for d in devices]
  if not peaks or None in peaks:
    return None
  return tokens_per_s * flops_per_token(model_cfg, seq_len, train) / sum(peaks)
