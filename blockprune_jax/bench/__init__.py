"""Benchmarks: `python -m blockprune_jax.bench WHAT` (__main__.py) and the pieces it runs.

    __main__     eval / train / mask / compact / sweep / side_by_side / tasks / aot, JSON lines
    sweep        a sweep's cost beyond its steps, one after another vs side by side
    tasks        lm-eval requests per second, ours vs the harness's HFLM
    aot          will it fit? the real steps compiled for a TPU slice, per-chip memory
    torch_ref    transformers' PyTorch GPT-2 (eager, SDPA, torch.compile) on the same shapes
    allocation   the measured allocations vs the ramps and a brute-force grid
"""


# Figures shared by the JAX and the PyTorch benches (no JAX imported here: torch_ref reads them).

# Dense bf16 peak FLOP/s per chip, from vendor data sheets.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def peak_flops_for(kind: str, count: int = 1):
  """Peak FLOP/s of `count` chips whose name contains a PEAK_FLOPS key; None if unknown."""
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak * count
  return None


def matmul_flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int,
                           train: bool) -> float:
  """PaLM's count from N (parameters in matrix multiplies): shared with torch_ref."""
  f = 6 * n_params + 12 * n_layer * n_embd * seq_len
  return f if train else f / 3
