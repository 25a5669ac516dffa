"""The one exception type for mistakes a user can fix.

`main` prints its message as a single line (no traceback), so the message must name the
config key, file or value at fault and say what would fix it.
"""


def one_line(e: BaseException, limit: int = 300) -> str:
  """An exception as "Type: first line of its message" (at most `limit` characters of it), for
  one-line UserError messages that quote what went wrong underneath."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


class UserError(Exception):
  """A bad config value, missing file or unreachable hub; str(e) is the whole story."""


class Preempted(Exception):
  """SIGTERM arrived during training; a checkpoint of the current step was written first.

  Not a failure: the same command resumes. Sweeps stop (rather than go on to the next run).
  """


class NoSpace(UserError):
  """A write failed because the filesystem is full (ENOSPC) or the quota is spent (EDQUOT).

  `main` prints it as one line and exits with EXIT_NO_SPACE; what was written completely
  (earlier checkpoints, results) is kept, so the same command resumes once space is freed.
  Made by `files.no_space_error`, which knows the free space.
  """
