"""python -m blockprune_jax.report SWEEP_DIR ...: report.md, report.csv and plots of sweeps."""
import sys

from blockprune_jax.report import main

sys.exit(main())
