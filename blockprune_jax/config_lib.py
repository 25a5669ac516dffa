"""Config overrides in one place: dotted keys, values typed like the key, one-line errors.

ml_collections does the setting and the casting (`update_from_flattened_dict` on a copy: int ->
float, list -> tuple, a wrong type refused); this module adds what a command line needs on top:
text parsed to the key's type (`--sweep=train.steps=10,20`), a near miss for a mistyped key, and
errors as one `UserError` line that names the key.
"""
import ast
import copy
import difflib
import functools
import importlib.util
from typing import Any

import ml_collections

from blockprune_jax.errors import UserError
from blockprune_jax.rules import is_int, is_number

_TRUE = {"true", "t", "yes", "y", "on", "1"}
_FALSE = {"false", "f", "no", "n", "off", "0"}


def load_file(path: str, name: str = "_blockprune_config"):
  """The Python config file at `path` as a module (its get_config, get_sweep)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def strip_prefix(key: str) -> str:
  """`config.a.b` (the spelling of --config.a.b flags) -> `a.b`."""
  return key[len("config."):] if key.startswith("config.") else key


def lookup(config, key: str) -> Any:
  """The value at dotted `key` of a ConfigDict or dict; UserError naming the key if absent."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      known = sorted(node.keys()) if hasattr(node, "keys") else []
      hint = difflib.get_close_matches(part, known, n=1)
      where = ".".join(parts[:i]) or "the top level"
      raise UserError(
          f"unknown config key '{key}' ('{part}' is not in {where}"
          + (f"; did you mean '{'.'.join(parts[:i] + hint)}'?)" if hint
             else f"; keys there: {', '.join(known)})"))
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise UserError(f"config key '{key}' is a group, not a value; set one of its keys "
                    f"({', '.join(sorted(node.keys()))})")
  return node


def flatten(config, prefix: str = "", sep: str = ".") -> dict:
  """{dotted key: value} of every leaf of a ConfigDict or nested dict (tuples and lists stay
  values); `sep` joins the parts ('/' for W&B's summary keys)."""
  flat = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      flat.update(flatten(v, f"{prefix}{k}{sep}", sep))
    else:
      flat[f"{prefix}{k}"] = v
  return flat


def unflatten(flat: dict) -> ml_collections.ConfigDict:
  """{dotted key: value} -> a ConfigDict of groups, in the order of `flat`."""
  nested = {}
  for key, value in flat.items():
    *groups, name = key.split(".")
    functools.reduce(lambda node, group: node.setdefault(group, {}), groups, nested)[name] = value
  return ml_collections.ConfigDict(nested)


def parse_text(key: str, text: str, like: Any) -> Any:
  """Command-line text -> a value of the type of `like` (the key's current value).

  Tuples take comma-separated elements; elements of an empty default tuple become floats
  where they parse as numbers, so `0` and `0.0` name the same run.
  """
  text = text.strip()
  if isinstance(like, (tuple, list)):
    inner = text.strip("()[]")
    elem = like[0] if len(like) else None
    return tuple(parse_text(key, t, elem) if elem is not None else _number_or_text(t)
                 for t in inner.split(",") if t.strip())
  if isinstance(like, str):
    return text
  if isinstance(like, bool):
    if text.lower() in _TRUE | _FALSE:
      return text.lower() in _TRUE
    raise UserError(f"cannot parse '{text}' for config key '{key}' as bool (true or false)")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if like is None:
      return text
    raise UserError(f"cannot parse '{text}' for config key '{key}' as {type(like).__name__} "
                    f"(its current value is {like!r})") from None
  return coerce(key, value, like)


def coerce(key: str, value: Any, like: Any) -> Any:
  """A Python value (from get_sweep, a flag or code) checked against the key's type.

  ml_collections casts int -> float and list -> tuple; we also take text (parsed), whole floats
  for int keys (`2e1` steps) and make numbers in an empty default tuple floats.
  """
  if isinstance(value, str) and not isinstance(like, str):
    return parse_text(key, value, like)
  if isinstance(like, (tuple, list)) and isinstance(value, (tuple, list)):
    if len(like):
      return tuple(coerce(key, v, like[0]) for v in value)
    return tuple(float(v) if is_number(v) else v for v in value)
  if isinstance(like, float) and is_number(value):
    return float(value)
  if is_int(like) and isinstance(value, float):
    if not value.is_integer():
      raise UserError(f"cannot parse '{value}' for config key '{key}' as int "
                      f"(its current value is {like!r})")
    return int(value)
  if isinstance(like, bool) != isinstance(value, bool) and like is not None:
    raise UserError(f"config key '{key}' holds a {type(like).__name__} ({like!r}); "
                    f"cannot use {value!r} ({type(value).__name__})")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A locked copy of `config` with `overrides` ({dotted key: value or text}) set; UserError
  naming the key for an unknown key or a value of the wrong type."""
  typed = {}
  for key, value in overrides.items():
    key = strip_prefix(key)
    typed[key] = coerce(key, value, lookup(config, key))
  new = copy.deepcopy(config)
  with new.unlocked():
    for key, value in typed.items():
      try:
        new.update_from_flattened_dict({key: value})
      except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"cannot set config key '{key}' to {value!r}: "
                        f"{str(e).strip(chr(39))}") from None
  new.lock()
  return new


def _number_or_text(text: str) -> Any:
  try:
    return float(text)
  except ValueError:
    return text.strip()
