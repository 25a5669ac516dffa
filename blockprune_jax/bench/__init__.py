"""Benchmarks: `python -m blockprune_jax.bench WHAT` (__main__.py) and the pieces it runs.

    __main__     eval / train / mask / compact / sweep / side_by_side / tasks / aot, JSON lines
    sweep        a sweep's cost beyond its steps, one after another vs side by side
    tasks        lm-eval requests per second, ours vs the harness's HFLM
    aot          will it fit? the real steps compiled for a TPU slice or GPUs, per-chip memory
    torch_ref    transformers' PyTorch GPT-2 (eager, SDPA, torch.compile) on the same shapes
    allocation   the measured allocations vs the ramps and a brute-force grid
"""

