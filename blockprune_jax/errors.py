"""The one exception type for mistakes a user can fix.

`main` prints its message as a single line (no traceback), so the message must name the
config key, file or value at fault and say what would fix it.
"""


class UserError(Exception):
  """A bad config value, missing file or unreachable hub; str(e) is the whole story."""


class Preempted(Exception):
  """SIGTERM arrived during training; a checkpoint of the current step was written first.

  Not a failure: the same command resumes. Sweeps stop (rather than go on to the next run).
  """
