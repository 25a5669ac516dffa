"""What one config key is (`Key`: default, rule, meaning, facts) and the rules for one value.

`rule.check(key, value)` raises one UserError line naming the key. configs/base.py declares every
key with these; a pruning method declares its options (`Option`) on its registry entry. Imports
nothing heavy, so configs/base.py and the method modules can both use it.
"""
import dataclasses
import math
from typing import Any, Callable

from blockprune_jax.errors import UserError

# XLA shapes, our int32 step / data-position counters and jax.random seeds hold no more.
INT_MAX = 2**31 - 1
CURRENT = "<the resumed run's value>"  # legacy value of keys a checkpoint cannot have used
NO_LEGACY = object()  # the key is in every checkpoint, or a resumed run may change it


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: default, rule, one-line meaning (docs/config.md), and what the harness
  must know about it.

  resume: a resumed run may change it (logging, evaluation, checkpoints, storage: not the
    trajectory). group: runs side by side as one program may differ in it (an input of the
    program, or read only outside it). legacy: what a checkpoint older than the key ran with
    (CURRENT: none can have used it, the resumed run's value stands). paired: the report's
    paired comparison lets runs differ in it (the seed, what tells allocations apart).
    needs: "pruning" / "distillation": only a pruned run / one with a teacher reads it (keys.py).
  """
  default: Any
  rule: Any
  help: str
  resume: bool = False
  group: bool = False
  legacy: Any = NO_LEGACY
  paired: bool = False
  needs: str = ""

  @property
  def has_legacy(self) -> bool:
    return self.legacy is not NO_LEGACY


@dataclasses.dataclass(frozen=True)
class Option:
  """A setting of one pruning method, the key `prune.<method>_<name>` (e.g. sparsegpt_damp),
  declared on the method's registry entry; `legacy` as for Key (methods are newer: CURRENT)."""
  name: str
  default: Any
  rule: Any
  help: str
  legacy: Any = CURRENT


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


class Int:
  """An integer in lo..hi."""

  def __init__(self, lo=0, hi=INT_MAX):
    self.lo, self.hi = lo, hi

  def what(self, v=None) -> str:
    if self.hi != INT_MAX:
      return f"an integer in {self.lo}..{self.hi}"
    too_big = is_number(v) and v > self.hi
    return f"an integer >= {self.lo}" + (f" and at most 2**31 - 1 ({INT_MAX})" if too_big else "")

  def check(self, key, v):
    if not is_int(v) or not self.lo <= v <= self.hi:
      raise UserError(f"{key}={v!r} must be {self.what(v)}")


class Float:
  """A finite number in an interval; `lo_open` / `hi_open` exclude the ends."""

  def __init__(self, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

  def what(self) -> str:
    if self.hi == math.inf:
      return f"a finite number {'>' if self.lo_open else '>='} {self.lo:g}"
    if self.lo == -math.inf:
      return f"a finite number {'<' if self.hi_open else '<='} {self.hi:g}"
    return (f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
            f"{')' if self.hi_open else ']'}")

  def ok(self, v) -> bool:
    if not is_number(v) or not math.isfinite(v):
      return False
    above = v > self.lo if self.lo_open else v >= self.lo
    below = v < self.hi if self.hi_open else v <= self.hi
    return above and below

  def check(self, key, v):
    if not self.ok(v):
      raise UserError(f"{key}={v!r} must be {self.what()}")


def _read(allowed) -> tuple:
  return tuple(allowed() if callable(allowed) else allowed)


class Choice:
  """One of `allowed`: a tuple, or a function returning one (a registry, read when checked)."""

  def __init__(self, allowed: tuple | Callable[[], tuple]):
    self._allowed = allowed

  @property
  def allowed(self) -> tuple:
    return _read(self._allowed)

  def check(self, key, v):
    if v not in self.allowed:  # the message is the one the README quotes
      raise UserError(f"{key}={v!r} is not one of {', '.join(self.allowed)}")


class Str:
  """Text; with `parse`, text it accepts (it raises one UserError line otherwise). Paths and
  names: validate.py's combinations check what they must hold."""

  def __init__(self, parse=None):
    self.parse = parse

  def check(self, key, v):
    if not isinstance(v, str):
      raise UserError(f"{key}={v!r} must be text (a string)")
    if self.parse:
      self.parse(v)


class Bool:

  def check(self, key, v):
    if not isinstance(v, bool):
      raise UserError(f"{key}={v!r} must be true or false")


class Numbers:
  """A tuple of numbers, each in `each` (a Float); optionally non-empty and strictly rising."""

  def __init__(self, each, nonempty=False, ascending=False):
    self.each, self.nonempty, self.ascending = each, nonempty, ascending

  def check(self, key, v):
    if not isinstance(v, (tuple, list)) or not all(self.each.ok(x) for x in v):
      raise UserError(f"{key}={v!r} must be a tuple of numbers, each {self.each.what()} "
                      f"(--config.{key}=0.1,0.2,...)")
    if self.nonempty and not v:
      raise UserError(f"{key}=() must hold at least one ratio (--config.{key}=0.2,0.5,...)")
    if self.ascending and any(b <= a for a, b in zip(v, v[1:])):
      raise UserError(f"{key}={tuple(v)!r} must be strictly ascending")


class Names:
  """A tuple of names ('a,b' in one element too, the flag's form), none twice. With `allowed`
  (as for Choice), at least one and each from it; the harness's task names are checked by
  validate.py, which knows the task directory."""

  def __init__(self, noun, allowed=None, example=""):
    self.noun, self._allowed, self.example = noun, allowed, example

  def check(self, key, v):
    allowed = _read(self._allowed) if self._allowed else ()
    if not isinstance(v, (tuple, list)) or not all(isinstance(s, str) for s in v):
      hint = ", ".join(allowed) or f"--config.{key}={self.example}"
      raise UserError(f"{key}={v!r} must be a tuple of {self.noun} names ({hint})")
    names = [s.strip() for item in v for s in item.split(",") if s.strip()]
    if allowed and not names:
      raise UserError(f"{key}={tuple(v)!r} names no {self.noun}: give one or more of "
                      f"{', '.join(allowed)}")
    for s in names if allowed else ():
      if s not in allowed:
        raise UserError(f"{key}: {s!r} is not one of {', '.join(allowed)}")
    if len(set(names)) < len(names):
      raise UserError(f"{key}={tuple(v)!r} names a {self.noun} twice")


class TokenCount:
  """0 (everything) or at least 2 tokens (a window scores the tokens after its first)."""

  def check(self, key, v):
    Int(0).check(key, v)
    if v == 1:
      raise UserError(f"{key}=1 must be 0 (all tokens) or at least 2 (one scored token)")


class DeviceGroup:
  """mesh.fsdp: -1 (every device) or a positive group size; whether it divides the device count
  is checked where the devices are known (parallel.fsdp_size)."""

  def check(self, key, v):
    if not is_int(v) or not (v == -1 or 1 <= v <= INT_MAX):
      raise UserError(f"{key}={v!r} must be -1 (every device) or a positive integer that "
                      "divides the device count (1 = replicated)")


POSITIVE = Int(1)
COUNT = Int(0)
RATIO = Float(0.0, 1.0, hi_open=True)
RATE = Float(0.0, lo_open=True)  # learning rates, temperatures: > 0
# prune.start / end / every: a fraction of the run (<= 1) or a step count (> 1).
WHEN = Float(0.0, float(INT_MAX))
