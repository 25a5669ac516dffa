"""Compilation: JAX's persistent cache, and a count of what each run compiled. After a sweep's
first run every step should come from a cache; the count shows a recompilation in results.json
(`runtime.compilations`, `runtime.compile_s`).
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
from blockprune_jax import quiet

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


def _on_event(event, **_):
  if event == _CACHE_HIT:
    _hit.pending = True


def install():
  """Starts counting (once per process)."""
  global _installed
  with _lock:
    if not _installed:
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
  names = collections.Counter(now["by_name"]) - collections.Counter(before["by_name"])
  return dict({k: now[k] - before[k] for k in _totals}, by_name=dict(names))


def add(a: dict, b: dict) -> dict:
  """Two `since` results as one (e.g. a run's own compilations and its group's)."""
  names = collections.Counter(a["by_name"]) + collections.Counter(b["by_name"])
  return dict({k: a[k] + b[k] for k in _totals}, by_name=dict(names))


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
  """Turns on JAX's persistent compilation cache in `directory` ("off": leave it off) for every
  program, however quick to compile (a CPU sweep's steps are); JAX opens it once per process.
  Returns the directory used."""
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
  quiet.chain(warnings, "showwarning", _cache_write_failed)
  return directory


_WRITE_FAILED = "Error writing persistent compilation cache entry"
_NO_MORE_WRITES = 2**62  # jax_persistent_cache_min_entry_size_bytes no program reaches


def _cache_write_failed(message, *_, **__):
  """JAX's failed cache writes (`warnings.showwarning`): one warning line, then no more writes in
  this process. JAX warns once per program and leaves the entry cut short, which a later process
  would warn reading: it goes."""
  text = str(message)
  if not text.startswith(_WRITE_FAILED):
    return False
  if jax.config.jax_persistent_cache_min_entry_size_bytes == _NO_MORE_WRITES:
    return True  # warned already
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", _NO_MORE_WRITES)
  cache_dir = jax.config.jax_compilation_cache_dir
  recent = [p for p in glob.glob(os.path.join(cache_dir, "*-cache"))
            if time.time() - os.path.getmtime(p) < 60]
  if recent:
    with contextlib.suppress(OSError):  # another process's, removed meanwhile
      os.remove(max(recent, key=os.path.getmtime))
  reason = files.no_space_reason(Exception(text)) or text.split("': ", 1)[-1]
  logging.warning("JAX compilation cache %s cannot be written (%s; %s free): compiling on "
                  "without caching new programs in this process", cache_dir, reason,
                  files.human_bytes(files.free_space(cache_dir)))
  return True

