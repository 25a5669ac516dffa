"""Files a run writes: atomically (a killed process never leaves half a file), as plain JSON."""
import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path beside `path`; on success it is renamed onto `path` in one step.

  The temporary file sits in the same directory (a rename across filesystems is not atomic)
  and is removed if the body raises, so `path` holds either the old or the new content.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def to_jsonable(x):
  """`json.dump`'s `default=`: arrays and numpy scalars as lists / numbers, the rest as text."""
  return x.tolist() if hasattr(x, "tolist") else str(x)


def plain(value):
  """Tuples (and nested ones) as lists, so a value equals what a JSON round trip gives back."""
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [plain(v) for v in value]
  return value


def write_json(path: str, obj, indent: int = 2) -> None:
  """JSON to `path`, atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=indent, default=to_jsonable)
      f.write("\n")
