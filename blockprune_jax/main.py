"""Entry point: flags only; the work happens in pipeline.run (which tests call directly).

    python -m blockprune_jax.main --config=configs/eval.py --workdir=runs/zero_shot \
        --config.model.name_or_path=gpt2

A config file that defines get_sweep() (hpml_grid, hpml_ramps, layer_scan, quickstart) runs as a
sweep: one workdir per run under --workdir, finished runs skipped, a report at the end.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from blockprune_jax.errors import Preempted, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # pylint: disable=import-outside-toplevel
  from blockprune_jax import parallel, pipeline, sweep
  try:
    parallel.maybe_initialize_distributed()
    runs = sweep.load_get_sweep(config_flags.get_config_filename(flags.FLAGS["config"]))
    if runs is None:
      pipeline.run(_CONFIG.value, _WORKDIR.value)
    else:
      rows = sweep.run_sweep(_CONFIG.value, _WORKDIR.value, sweep.expand_sweep(_CONFIG.value, None, runs))
      failed = [r["name"] for r in rows if r["status"] == "failed"]
      if failed:
        print(f"error: {len(failed)} of {len(rows)} runs failed (see sweep.json): "
              f"{', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(143)  # 128 + SIGTERM, what schedulers expect from a terminated job


if __name__ == "__main__":
  app.run(main)
