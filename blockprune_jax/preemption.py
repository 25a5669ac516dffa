"""A clean stop on preemption: SIGTERM (a preempted Cloud TPU VM gets one) or Ctrl-C makes the
train loop save a checkpoint and stop, with the same step on every process."""
import os
import signal
import threading

from absl import logging
import jax

from blockprune_jax.errors import Preempted


class PreemptionFlag:
  """Tells the train loop to save and stop (`check(step)`, every step on every process).

  One process: SIGTERM / SIGINT handlers set `requested`; a second Ctrl-C stops at once. Several
  processes must agree on the step, so the decision is jax's preemption sync point: a Python
  SIGTERM handler would replace jax's notifier (set from C), so none is installed, and a Ctrl-C
  becomes a SIGTERM to this process. `error()` is what the loop raises (exit code 128 + signum).
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self.signum = None
    self._signals = tuple(signals)
    self._previous = {}

  def install(self):
    if jax.process_count() > 1:
      if (signal.SIGINT in self._signals and _in_main_thread()
          and signal.getsignal(signal.SIGINT) not in (None, signal.SIG_IGN)):
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_as_sigterm)
      return self
    if not _in_main_thread():
      logging.warning('PreemptionFlag: signal handlers can only be set from the main thread; '
                      'SIGTERM will not trigger a final checkpoint.')
      return self
    for sig in self._signals:
      if signal.getsignal(sig) in (None, signal.SIG_IGN):
        # None: set outside Python (jax's notifier; `check` covers it). SIG_IGN: the launcher's
        # choice (a shell's for SIGINT of `cmd &`).
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
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

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()


def _in_main_thread():
  return threading.current_thread() is threading.main_thread()


def _reached_preemption_sync_point(step):
  """jax's multi-host preemption agreement; False where there is none."""
  try:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))
  except (ImportError, AttributeError, RuntimeError):
    return False
