"""Files a run writes (atomically: a killed process never leaves half a file), reads back
(checked) and locks. Nothing here deletes a user's file: an unreadable results.json or a
replaced export is moved aside. A full disk, however a library wrapped it, becomes one NoSpace
line here (`writing` / `as_no_space`).
"""
import contextlib
import errno
import filecmp
import json
import os
import shutil
import socket
import tempfile
import time

from absl import logging
import filelock

from blockprune_jax.errors import NoSpace, UserError, one_line

RESULTS = "results.json"  # a finished run's record, in its workdir
SWEEP_JSON = "sweep.json"  # a sweep's rows (run, status, error), in the sweep's workdir
LOCK_FILE = ".lock"  # in the workdir, held while a run uses it


@contextlib.contextmanager
def atomic_path(path: str, what: str = ""):
  """Yields a temporary path beside `path` (a rename across filesystems is not atomic), renamed
  onto `path` on success and removed if the body raises. A full disk: one line naming `what`."""
  directory = os.path.dirname(os.path.abspath(path))
  with writing(what or os.path.basename(path), path):
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp-")
    os.close(fd)
    try:
      yield tmp
      os.chmod(tmp, 0o644)  # mkstemp makes it private; what a run writes is meant to be read
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


def write_json(path: str, obj) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=to_jsonable)
    f.write("\n")


def load_json(path: str):
  """The JSON object in `path`; None when there is no file; ValueError (the reason) when it is
  not a readable JSON object."""
  if not os.path.lexists(path):
    return None
  if os.path.isdir(path):
    raise UserError(f"{path} is a directory, where a run keeps a file: move it away")
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(one_line(e)) from None
  if not isinstance(obj, dict):
    raise ValueError(f"holds a {type(obj).__name__}, not a JSON object")
  return obj


def readable_json(path: str) -> bool:
  """Whether `path` holds a readable JSON object (a sweep counts such a run as done)."""
  try:
    return load_json(path) is not None
  except ValueError:
    return False


def read_results(path: str, primary: bool = True):
  """A finished run's results.json, or None when the run has to (re)run: an unreadable one is
  moved aside (by the primary process) with a one-line warning."""
  try:
    return load_json(path)
  except ValueError as e:
    aside = move_aside(path, "unreadable") if primary else path
    logging.warning("%s is unreadable (%s); moved it to %s and running again (the run resumes "
                    "from its checkpoints)", path, e, aside)
    return None


def move_aside(path: str, why: str) -> str:
  """Renames `path` to `<path>.<why>-<time>` (a free name) and returns the new name."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for i in range(1000):
    new = f"{path}.{why}-{stamp}" + (f"-{i}" if i else "")
    if not os.path.lexists(new):
      os.rename(path, new)
      return new
  raise UserError(f"cannot move {path} aside: too many {path}.{why}-* already; remove old ones")


def check_directory(path: str, name: str) -> None:
  """UserError unless `path` is a directory or does not exist yet (it will be created)."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(f"{name}={path!r} is a file, not a directory: give a new or existing "
                    "directory")


def check_file(path: str, name: str) -> None:
  """UserError unless `path` is an existing, readable file."""
  if os.path.isdir(path):
    raise UserError(f"{name}={path!r} is a directory, not a file: give the file's path")
  if not os.path.isfile(path):
    raise UserError(f"{name}={path!r}: no such file")
  if not os.access(path, os.R_OK):
    raise UserError(f"{name}={path!r} is not readable: check its permissions")


# What a workdir holds and of which kind: a wrong kind would only fail after all the work.
_WORKDIR_LAYOUT = {RESULTS: "file", "log.jsonl": "file", "metrics.jsonl": "file",
                   "checkpoints": "directory", "export": "directory"}


def check_workdir_layout(workdir: str) -> None:
  """UserError if an entry the run will write is there with the wrong kind (file vs dir)."""
  for name, kind in _WORKDIR_LAYOUT.items():
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and os.path.isdir(path) != (kind == "directory"):
      raise UserError(f"{path} should be a {kind} (the run writes one there): move it away")


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `<workdir>/.lock` for the body; UserError if another process holds it. The kernel
  drops the lock when its process dies (even by SIGKILL); the file names its last holder."""
  check_directory(workdir, "--workdir")
  path = os.path.join(workdir, LOCK_FILE)
  lock = filelock.FileLock(path, timeout=0)
  try:
    os.makedirs(workdir, exist_ok=True)
    lock.acquire()
  except filelock.Timeout:
    with open(path, encoding="utf-8", errors="replace") as f:
      holder = f.read(200).strip() or "pid unknown"
    raise UserError(f"{workdir} is in use by another run ({holder}; lock {path}): wait for it "
                    "to finish, or use another --workdir") from None
  except OSError as e:
    raise UserError(f"--workdir={workdir!r}: cannot write there ({one_line(e)}): choose a "
                    "writable directory") from None
  try:
    with open(path, "w", encoding="utf-8") as f:
      f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    yield path
  finally:
    lock.release()


@contextlib.contextmanager
def atomic_directory(path: str):
  """Yields a temporary directory beside `path`, which becomes `path` on success. An existing
  `path` with the same files is kept; a different one is moved aside (one warning line), so an
  earlier export is never overwritten."""
  parent = os.path.dirname(os.path.abspath(path))
  with writing(os.path.basename(path), path):
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
      yield tmp
      os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
      if os.path.isdir(path) and _same_files(tmp, path):
        shutil.rmtree(tmp)
        return
      if os.path.lexists(path):
        aside = move_aside(path, "replaced")
        logging.warning("%s held other files; moved them to %s", path, aside)
      os.rename(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise


def _same_files(a: str, b: str) -> bool:
  """Whether directories `a` and `b` hold the same names with the same bytes (flat)."""
  names = sorted(os.listdir(a))
  if names != sorted(os.listdir(b)):
    return False
  _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
  return not mismatch and not errors


def dir_stamp(path: str) -> tuple:
  """(real path, (name, size, mtime) per file): a cache key that changes with any file."""
  path = os.path.realpath(path)
  entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)
                   if e.is_file())
  return path, tuple(entries)


def emit_json_line(record: dict, path: str = "") -> dict:
  """Prints `record` as one JSON line on stdout and, with `path`, appends the line there too."""
  line = json.dumps(record)
  print(line, flush=True)
  if path:
    append_line(path, line)
  return record


def append_line(path: str, line: str) -> None:
  """Appends `line` to `path`; on a full disk the part written is cut off again (a resumed run
  appends whole lines)."""
  with writing(os.path.basename(path), path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      end = os.lseek(fd, 0, os.SEEK_END)
      data = (line + "\n").encode("utf-8")
      try:
        while data:  # unbuffered: a short write is seen here, not when the file closes
          data = data[os.write(fd, data):]
      except BaseException:
        os.ftruncate(fd, end)
        raise
    finally:
      os.close(fd)


# C++ writers (TensorStore under Orbax) report these inside their own exceptions, by text.
_NO_SPACE = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded"}


def no_space_reason(e: BaseException):
  """The reason ("No space left on device", "Disk quota exceeded") when `e` or its cause or
  context is one, also wrapped by a library; else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    for code, reason in _NO_SPACE.items():
      if (isinstance(e, OSError) and e.errno == code) or reason in str(e):
        return reason
    e = e.__cause__ or e.__context__
  return None


def free_space(path: str):
  """Free bytes for this user where `path` (or its nearest existing parent) is; None if unknown."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


def human_bytes(n) -> str:
  """1536 -> '1.5 KiB', 1234567 -> '1.18 MiB'."""
  if n is None:
    return "unknown"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024:
      return f"{n} B" if unit == "B" else f"{n:.3g} {unit}"
    n /= 1024
  return f"{n:.3g} TiB"


def no_space_error(what: str, path: str, reason: str = _NO_SPACE[errno.ENOSPC]) -> NoSpace:
  """The one line a full disk ends in: what was written where, and what is free now."""
  return NoSpace(f"{reason} writing {what} to {path} ({human_bytes(free_space(path))} free); "
                 "free space and run the same command again to resume")


def as_no_space(e: BaseException, what, path: str, cleanup=None):
  """The NoSpace line for `e` if it is a full disk, else None. `what` is a text or a function
  giving it; `cleanup()` runs first (a partial write removed: the free space named is a rerun's)."""
  reason, free = no_space_reason(e), free_space(path)
  if reason is None and isinstance(e, (OSError, ValueError)) and free is not None and free < 2**16:
    # On a full disk a library may first report a consequence (a directory not made).
    reason = _NO_SPACE[errno.ENOSPC]
  if reason is None:
    return None
  if cleanup is not None:
    cleanup()
  return no_space_error(what() if callable(what) else what, path, reason)


@contextlib.contextmanager
def writing(what, path: str, cleanup=None):
  """A full disk in the body raised as its NoSpace line; other errors pass unchanged."""
  try:
    yield
  except NoSpace:
    raise
  except Exception as e:  # pylint: disable=broad-except
    error = as_no_space(e, what, path, cleanup)
    if error is None:
      raise
    raise error from e
