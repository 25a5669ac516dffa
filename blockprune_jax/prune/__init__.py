"""Pruning: what to prune and how much (the family of modules behind `prune.*`).

    pruning      the criteria registry, exact-count masks, N:M patterns, apply / sparsity / compact
    sparsegpt    SparseGPT and N:M keep-masks as jitted pure functions of one kernel
    calibration  calibration sequences, input statistics, layer-by-layer (sequential) pruning
    allocation   the allocation registry: blocks and ratios, measured ones (sensitivity, search)
    solve        ratios at an exact budget: clipping, the sensitivity solve, the budgeted search
    gmp          the gradual (cubic) schedule in steps
    plan         the prune.* keys applied to one model: the one Plan
"""
