"""The exceptions `main` turns into one line and an exit code (no traceback): their message
must name the key, file or value at fault and say what would fix it."""


def one_line(e: BaseException, limit: int = 300) -> str:
  """An exception as "Type: first line of its message", to quote in a one-line UserError."""
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


class UserError(Exception):
  """A bad config value, missing file or unreachable hub; str(e) is the whole story."""


class Preempted(Exception):
  """A stop asked for by a signal, after a checkpoint: the same command resumes; a sweep stops
  rather than go on to its next run."""


class NoSpace(UserError):
  """A full disk or spent quota (made by `files.no_space_error`, which knows the free space);
  what was written completely is kept, so the same command resumes once space is freed."""
