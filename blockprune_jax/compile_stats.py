"""Compilation: JAX's persistent cache, and a count of what each run compiled.

A sweep's runs share shapes, so after the first run every train and eval step should come from
a cache: in one process from the step functions kept by `train.make_train_step` and
`evaluate.make_eval_step`, across processes from JAX's persistent compilation cache. The counter
makes a recompilation visible in results.json (`runtime.compilations`, `runtime.compile_s`).
"""
import collections
import contextlib
import glob
import os
import threading
import time
import warnings

import jax
from absl import logging

from blockprune_jax import files

# Every request for an executable ends with this event (with the jitted function's name), also
# one the persistent cache answered; such a hit is announced by _CACHE_HIT just before, on the
# same thread, so the pair is counted as a hit rather than a compilation.
_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE_AND_LOWER = ("/jax/core/compile/jaxpr_trace_duration",
                    "/jax/core/compile/jaxpr_to_mlir_module_duration")
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {"compilations": 0, "compile_s": 0.0, "cache_hits": 0}
_by_name = collections.Counter()
_installed = False
_hit = threading.local()  # set by a cache hit, consumed by the request event that follows


def _on_duration(event, duration, **kwargs):
  with _lock:
    if event == _COMPILE:
      if getattr(_hit, "pending", False):
        _hit.pending = False
        _totals["cache_hits"] += 1
      else:
        _totals["compilations"] += 1
        _by_name[kwargs.get("fun_name", "?")] += 1
        _totals["compile_s"] += duration
    elif event in _TRACE_AND_LOWER:
      _totals["compile_s"] += duration


def _on_event(event, **kwargs):
  del kwargs
  if event == _CACHE_HIT:
    _hit.pending = True


def install():
  """Starts counting (once per process)."""
  global _installed
  with _lock:
    if _installed:
      return
    _installed = True
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


def snapshot() -> dict:
  """Totals so far: compilations, compile_s, cache_hits, and compilations per function name."""
  with _lock:
    return dict(_totals, by_name=dict(_by_name))


def since(before: dict) -> dict:
  """What was compiled after `before` (a snapshot)."""
  now = snapshot()
  names = {k: v - before["by_name"].get(k, 0) for k, v in now["by_name"].items()}
  return {"compilations": now["compilations"] - before["compilations"],
          "compile_s": now["compile_s"] - before["compile_s"],
          "cache_hits": now["cache_hits"] - before["cache_hits"],
          "by_name": {k: v for k, v in names.items() if v}}


def add(a: dict, b: dict) -> dict:
  """Two `since` results as one (e.g. a run's own compilations and its group's)."""
  names = dict(a["by_name"])
  for k, v in b["by_name"].items():
    names[k] = names.get(k, 0) + v
  return {"compilations": a["compilations"] + b["compilations"],
          "compile_s": a["compile_s"] + b["compile_s"],
          "cache_hits": a["cache_hits"] + b["cache_hits"], "by_name": names}


@contextlib.contextmanager
def counting():
  """Yields a dict that holds, once the block ends, what the block compiled (see `since`)."""
  install()
  before, out = snapshot(), {}
  try:
    yield out
  finally:
    out.update(since(before))


def enable_persistent_cache(directory: str) -> str:
  """Turns on JAX's persistent compilation cache in `directory` ("off": leave it off).

  Every program is cached, however quick to compile: on a CPU the small steps of a sweep are
  exactly what a second process would otherwise compile again. Returns the directory used.
  JAX opens its cache once per process: the first run's choice holds for the rest of a sweep.
  """
  if directory == "off":
    return ""
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:  # a cache is worth a warning, never a failed run
    logging.warning("JAX compilation cache %s cannot be created (%s: %s); compiling without it",
                    directory, type(e).__name__, e.strerror or e)
    return ""
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logging.info("JAX compilation cache: %s", directory)
  _warn_once_when_writes_fail(directory)
  return directory


_WRITE_FAILED = "Error writing persistent compilation cache entry"
_NO_MORE_WRITES = 2**62  # jax_persistent_cache_min_entry_size_bytes no program reaches


def _warn_once_when_writes_fail(directory):
  """One warning line the first time JAX cannot write a cache entry (a full disk, a read-only
  directory), then no more writes in this process.

  JAX itself only warns, but once per program (dozens of lines), and leaves the entry it was
  writing cut short, which every later process would fail to read (a warning each time). That
  entry is the newest file in the cache; it is removed (a cache entry is safe to remove).
  """
  previous = warnings.showwarning
  if getattr(previous, "_blockprune_cache", False):
    return

  def show(message, category, filename, lineno, file=None, line=None):
    text = str(message)
    if not text.startswith(_WRITE_FAILED):
      previous(message, category, filename, lineno, file, line)
      return
    cache_dir = jax.config.jax_compilation_cache_dir or directory
    if jax.config.jax_persistent_cache_min_entry_size_bytes == _NO_MORE_WRITES:
      return  # warned already
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", _NO_MORE_WRITES)
    _remove_newest_entry(cache_dir)
    reason = files.no_space_reason(Exception(text)) or text.split("': ", 1)[-1]
    logging.warning("JAX compilation cache %s cannot be written (%s; %s free): compiling on "
                    "without caching new programs in this process", cache_dir, reason,
                    files.human_bytes(files.free_space(cache_dir)))
  show._blockprune_cache = True  # pylint: disable=protected-access
  warnings.showwarning = show


def _remove_newest_entry(directory, within_s=60.0):
  entries = [p for p in glob.glob(os.path.join(directory, "*-cache"))
             if time.time() - os.path.getmtime(p) < within_s]
  if entries:
    try:
      os.remove(max(entries, key=os.path.getmtime))
    except OSError:
      pass  # another process's, removed meanwhile
