"""Entry point: flags only; the work happens in pipeline.run (which tests call directly).

    python -m blockprune_jax.main --config=configs/eval.py --workdir=runs/zero_shot \
        --config.model.name_or_path=gpt2

A config file that defines get_sweep() runs as a sweep: one workdir per run under --workdir.

Exit codes: 0 done; 1 a sweep finished with failed runs (each named); 2 a user error (one
`error: ...` line); 28 (ENOSPC) the disk is full or the quota spent (one `error: No space left
on device writing ...` line); 130 stopped by Ctrl-C; 143 by SIGTERM. After 28 (once space is
freed), 130 or 143 the same command resumes from its last checkpoint.
"""
import os
import re
import sys
import warnings

from absl import app
from absl import flags
from ml_collections import config_flags

from blockprune_jax import config_lib
from blockprune_jax import files
from blockprune_jax import quiet
from blockprune_jax.errors import NoSpace, Preempted, UserError, one_line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.json.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_FAILED_RUNS, EXIT_USER_ERROR, EXIT_NO_SPACE, EXIT_SIGINT, EXIT_SIGTERM = 1, 2, 28, 130, 143


def main(argv):
  quiet.console()
  try:
    _run(argv)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    _exit_for(e, _WORKDIR.value)


def _run(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every flag takes the form --name=value")
  # pylint: disable=import-outside-toplevel
  from blockprune_jax import parallel, pipeline, sweep, validate as validate_lib
  workdir = _WORKDIR.value
  if not workdir.strip():
    raise UserError("--workdir is empty: give the directory for this run's files")
  files.check_directory(workdir, "--workdir")
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  config = _load_config(config_path)
  runs = sweep.load_get_sweep(config_path)
  if runs is None:
    parallel.maybe_initialize_distributed()
    pipeline.run(config, workdir)  # validates the config unless the run is finished
    return
  runs = sweep.expand_sweep(config, None, runs)
  for run in runs:  # every unfinished run's settings checked before the first one starts
    name = sweep.run_name(run)
    if not files.readable_json(os.path.join(workdir, name, files.RESULTS)):
      try:
        validate_lib.validate(config_lib.apply_overrides(config, run))
      except UserError as e:
        raise UserError(f"sweep run {name}: {e}") from None
  parallel.maybe_initialize_distributed()
  _report_failed_runs(sweep.run_sweep(config, workdir, runs))


def _exit_for(e, workdir):
  """Exits with `e`'s code and one line (a full disk too where no writer said so); re-raises
  what is no user's to fix."""
  if isinstance(e, KeyboardInterrupt):
    _exit(EXIT_SIGINT, "interrupted: stopped at once (Ctrl-C); the last saved checkpoint is "
          "kept, run the same command to resume")
  if isinstance(e, Preempted):
    code = getattr(e, "exit_code", EXIT_SIGTERM)
    _exit(code, f"{'interrupted' if code == EXIT_SIGINT else 'preempted'}: {e}")
  if isinstance(e, UserError) and not isinstance(e, NoSpace):
    _exit(EXIT_USER_ERROR, f"error: {e}")
  path = next((x.filename for x in (e, e.__cause__, e.__context__)
               if getattr(x, "filename", None)), workdir)
  error = e if isinstance(e, NoSpace) else files.as_no_space(e, "the run's files", path)
  if error is None:
    raise e
  _exit(EXIT_NO_SPACE, f"error: {error}")


def _report_failed_runs(rows):
  """Exit 1 with one line per failed run of a sweep (its name and error), if any failed."""
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    for r in failed:
      print(f"failed: {r['name']}: {_first_line(r.get('error', ''))}", file=sys.stderr)
    _exit(EXIT_FAILED_RUNS, f"error: {len(failed)} of {len(rows)} runs failed (see sweep.json): "
          f"{', '.join(r['name'] for r in failed)}")


def _load_config(config_path):
  """The config with its --config.* overrides; one UserError line for a missing or broken file,
  an unknown key or a value of the wrong type."""
  files.check_file(config_path.partition(":")[0], "--config")
  try:
    return _CONFIG.value
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _config_error(config_path, e) from None


def _config_error(config_path, e) -> UserError:
  """What `e`, raised loading the config, means: an override naming no key of the file (raised,
  with a near miss), or the file itself failing (ml_collections raises whatever it raised)."""
  path, _, arg = config_path.partition(":")
  if path:
    try:
      module = config_lib.load_file(path, "_blockprune_check_config")
      base = module.get_config(arg) if arg else module.get_config()
    except Exception as load_error:  # pylint: disable=broad-except
      e = load_error
    else:
      for text in sys.argv[1:]:
        m = re.match(r"--?(?:no)?config\.([^=]+)", text)
        if m:
          config_lib.lookup(base, m.group(1))
  return UserError(f"--config={config_path}: could not load it ({one_line(e)})")


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag as one `error:` line and exit 2 (not absl's usage)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit(EXIT_USER_ERROR, f"error: {_first_line(str(e))}")
  except Exception as e:  # pylint: disable=broad-except
    # ml_collections loads the config file while the flags are parsed.
    config_path = next((a.split("=", 1)[1] for a in argv if re.match(r"--?config=", a)), "")
    try:
      error = _config_error(config_path, e)
    except UserError as bad:
      error = bad
    _exit(EXIT_USER_ERROR, f"error: {error}")


def _first_line(text):
  lines = str(text).strip().splitlines()
  return lines[0] if lines else ""


def _exit(code, line):
  # A writer stopped mid-save leaves coroutines never awaited, each reported at exit.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
  print(line, file=sys.stderr, flush=True)
  sys.exit(code)


def entry():
  """`python -m blockprune_jax.main`: a Ctrl-C before the run starts is one line, too."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:
    _exit(EXIT_SIGINT, "interrupted: stopped before any work was saved")


if __name__ == "__main__":
  entry()
