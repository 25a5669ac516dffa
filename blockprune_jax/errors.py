"""The one exception type for mistakes a user can fix.

`main` prints its message as a single line (no traceback), so the message must name the
config key, file or value at fault and say what would fix it.
"""


class UserError(Exception):
  """A bad config value, missing file or unreachable hub; str(e) is the whole story."""
