"""What libraries print that would bury our one line, kept quiet in one place: each hook drops
only what our line already says; everything else passes on."""
import contextlib
import logging
import os
import sys

from blockprune_jax import files


def chain(owner, name, handled):
  """Wraps the hook `owner.name` (sys.unraisablehook, threading.excepthook, warnings.showwarning)
  once: a call that `handled(*args)` takes (returns True) stops there, the rest go on."""
  previous = getattr(owner, name)
  if handled in getattr(previous, "_quiet", ()):
    return

  def hook(*args, **kwargs):
    if not handled(*args, **kwargs):
      previous(*args, **kwargs)
  hook._quiet = getattr(previous, "_quiet", ()) + (handled,)  # pylint: disable=protected-access
  setattr(owner, name, hook)


# Orbax warnings that say nothing to our user: a step without a metric (only evaluation steps
# carry one), without step metadata (our warning names the step), a save that waited for the
# previous one (we wait on purpose; under load it takes a second).
_ORBAX_CHATTER = ("did not provide metrics", "Metadata file does not exist",
                  "Waiting for previous save to complete")


class _OrbaxFilter(logging.Filter):
  """Drops Orbax's INFO lines (dozens per save), _ORBAX_CHATTER, a full disk's tracebacks
  (NoSpace says it) and, while `muted`, everything."""

  muted = 0

  def filter(self, record):
    if "orbax" not in record.pathname.replace(os.sep, "/").split("/"):
      return True
    if self.muted or record.levelno < logging.WARNING:
      return False
    message = record.getMessage()
    return not (any(text in message for text in _ORBAX_CHATTER)
                or files.no_space_reason(record.exc_info[1] if record.exc_info else None)
                or files.no_space_reason(Exception(message)))


_ORBAX = _OrbaxFilter()


def _not_unretrieved(record):
  """A failed Orbax write leaves asyncio tasks whose error nobody retrieves."""
  return "exception was never retrieved" not in record.getMessage()


def _closed_loop_noise(unraisable):
  """TensorStore callbacks into Orbax's closed event loop after a failed write, and abandoned
  write coroutines collected while Python shuts down."""
  text = str(unraisable.exc_value)
  return "Event loop is closed" in text or "Python is likely shutting down" in text


def orbax():
  """Installs the Orbax, asyncio and closed-loop filters (once: addFilter skips a known one)."""
  logging.getLogger("absl").addFilter(_ORBAX)
  logging.getLogger("asyncio").addFilter(_not_unretrieved)
  chain(sys, "unraisablehook", _closed_loop_noise)


@contextlib.contextmanager
def orbax_muted():
  """Orbax logs nothing in the body."""
  _ORBAX.muted += 1
  try:
    yield
  finally:
    _ORBAX.muted -= 1


def console():
  """Warnings and our own lines only (no absl / JAX INFO chatter), unless --verbosity asks."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  if "verbosity" not in flags.FLAGS or not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
