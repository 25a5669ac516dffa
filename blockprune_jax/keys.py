"""Every config key with its facts, from its one declaration in configs/base.py (rules.Key).

The lists other modules would keep by hand derive from here: validate.RULES, train's resumable
and legacy keys, the keys runs trained together may differ in, report's allocation keys and the
keys sweep's dense controls drop. `python -m blockprune_jax.keys > docs/config.md` writes the
reference of every key.
"""
import dataclasses
import functools

from blockprune_jax.rules import CURRENT, Choice
from configs import base

# A run without pruning / without a teacher ignores these sections (a dense control drops them).
_NEEDS = {"prune": "pruning", "distill": "distillation"}
KEYS = {k: dataclasses.replace(key, needs=_NEEDS.get(k.split(".")[0], ""))
        for k, key in base.KEYS.items()}


@functools.lru_cache(maxsize=None)
def where(**fact) -> frozenset:
  """The keys with the given facts, e.g. where(resume=True), where(needs="pruning")."""
  return frozenset(k for k, key in KEYS.items()
                   if all(getattr(key, f) == v for f, v in fact.items()))


def legacy_values(saved: dict, current: dict) -> dict:
  """The entries a checkpoint written before some keys existed ran with, for keys it lacks."""
  return {k: current[k] if KEYS[k].legacy == CURRENT else KEYS[k].legacy
          for k in current if k not in saved and k in KEYS and KEYS[k].has_legacy}


def reference() -> str:
  """docs/config.md: a markdown table of every key (key, default, meaning, and for choices what
  is allowed)."""
  lines = ["# Config keys", "",
           "Generated from `configs/base.py` by `python -m blockprune_jax.keys > docs/config.md` "
           "(tests/test_keys.py checks it is current). Override any key with "
           "`--config.KEY=VALUE`.", "",
           "| key | default | meaning |", "|---|---|---|"]
  for k, key in KEYS.items():
    meaning = key.help
    if isinstance(key.rule, Choice):
      meaning += f" (one of: {', '.join(key.rule.allowed)})"
    lines.append(f"| `{k}` | `{key.default!r}` | {meaning.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(reference(), end="")
