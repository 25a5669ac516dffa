"""A clean stop on preemption: SIGTERM (a preempted Cloud TPU VM gets one) or Ctrl-C makes the
train loop save a checkpoint and stop, with the same step on every process."""
import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils

from blockprune_jax.errors import Preempted


class PreemptionFlag:
  """Tells the train loop to save and stop (`check(step)`, every step on every process).

  One process: SIGTERM / SIGINT handlers set `requested`; a second Ctrl-C stops at once. Several
  processes must agree on the step, so the decision is jax's preemption sync point: a Python
  SIGTERM handler would replace jax's notifier (set from C), so none is installed, and a Ctrl-C
  becomes a SIGTERM to this process. `error()` is what the loop raises (exit code 128 + signum).
  """

  def __init__(self):
    self.requested = False
    self.signum = None
    self._previous = {}

  def __enter__(self):
    several = jax.process_count() > 1
    if threading.current_thread() is not threading.main_thread():
      if not several:
        logging.warning('PreemptionFlag: signal handlers can only be set from the main thread; '
                        'SIGTERM will not trigger a final checkpoint.')
      return self
    for sig in (signal.SIGINT,) if several else (signal.SIGTERM, signal.SIGINT):
      # None: set outside Python (jax's notifier; `check` covers it). SIG_IGN: the launcher's
      # choice (a shell's for SIGINT of `cmd &`).
      if signal.getsignal(sig) not in (None, signal.SIG_IGN):
        handler = self._forward_as_sigterm if several else self._handle
        self._previous[sig] = signal.signal(sig, handler)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, the last checkpoint is kept
    # Only set a flag: the handler runs between bytecodes, possibly inside a save.
    self.requested = True
    self.signum = signum
    logging.warning('Received %s: will save a checkpoint and stop (at the end of this step).',
                    signal.Signals(signum).name)

  def _forward_as_sigterm(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning('Received SIGINT: asking all processes to save a checkpoint and stop.')
    os.kill(os.getpid(), signal.SIGTERM)

  def check(self, step):
    """True once the loop should save and stop."""
    if (not self.requested and signal.SIGTERM not in self._previous
        and _reached_preemption_sync_point(step)):
      self.requested = True
      self.signum = self.signum or signal.SIGTERM
      logging.warning('Step %d: reached the preemption sync point; saving and stopping.', step)
    return self.requested

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum or signal.SIGTERM).name

  def error(self, message) -> Preempted:
    """The exception that ends the run; main exits with its `exit_code` (130 / 143)."""
    e = Preempted(f'{self.signal_name}: {message}')
    e.exit_code = 128 + int(self.signum or signal.SIGTERM)
    return e


def _reached_preemption_sync_point(step):
  try:
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))
  except RuntimeError:  # no preemption service in this process
    return False
