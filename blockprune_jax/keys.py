"""Every config key of configs/base.py, declared once with what the code needs to know about it.

    KEYS["train.batch_size"]   Key(rule, resume, group, legacy, needs, paired)

- rule: how validate.py checks one value (`rule.check(key, value)` raises one UserError line).
- resume: a resumed run may change it (it does not alter the trajectory: logging, evaluation,
  checkpoints, where things are stored).
- group: runs trained side by side as one program may differ in it (the program takes it as an
  input, or it is only read outside the program).
- legacy: for a key that changes the trajectory but was added after resuming was first checked
  (commit 5eb2ad3), the value a checkpoint without it ran with; CURRENT for keys of methods that
  did not exist then (such a checkpoint cannot have used them: the resumed run's value stands).
- needs: "pruning" / "distillation": the key is read only by a pruned run / with a teacher, so a
  run without that ignores it (a dense control drops the pruning keys).
- paired: report's paired comparison lets runs differ in it: the seed it pairs by and what
  tells two block allocations apart.

The defaults and the one-line meanings stay in configs/base.py, next to each other, as a config
file users read; `help_texts()` reads the meanings from its comments and `reference()` renders
docs/config.md from both. The lists the other modules used to keep by hand derive from here:
validate.RULES, train's resumable and legacy keys, batched.FREE_KEYS, report's allocation keys
and the keys sweep's dense controls drop. A pruning method's options are keys too: each
`pruning.Option` of a registered method is the key `prune.<method>_<option>` (rule, default and
meaning on the registry entry), so a new method brings its keys with it. Choices kept by modules
that load transformers or the planner (data sources, schedules) are read when a value is checked.
"""
import ast
import dataclasses
import functools
import io
import os
import tokenize
from typing import Any

from blockprune_jax.prune import allocation
from blockprune_jax.prune import pruning
from blockprune_jax import wandb_log
from blockprune_jax.errors import UserError
from blockprune_jax.rules import (COUNT, INT_MAX, POSITIVE, RATE, RATIO, WHEN, Bool, Choice,
                                  DeviceGroup, Float, Int, Numbers, Splits, Str, TokenCount,
                                  CURRENT)

ROLES = ("experiment", "base", "control")  # base: pipeline.base_config; control: sweep controls
BASE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "base.py")


class Pattern:
  """prune.pattern: `unstructured` or N:M (pruning.parse_pattern says why not)."""

  def check(self, key, v):
    Str().check(key, v)
    pruning.parse_pattern(v)


class TaskNames:
  """eval.tasks: names of lm-evaluation-harness tasks ('piqa,hellaswag' in one element too), no
  repeats; whether the harness knows them is checked by validate._check_tasks."""

  def check(self, key, v):
    from blockprune_jax import tasks  # pylint: disable=import-outside-toplevel
    if not isinstance(v, (tuple, list)) or not all(isinstance(s, str) for s in v):
      raise UserError(f"{key}={v!r} must be a tuple of task names (--config.{key}=piqa,hellaswag)")
    names = tasks.split_names(v)
    if len(set(names)) < len(names):
      raise UserError(f"{key}={tuple(v)!r} names a task twice")


def _schedules():
  from blockprune_jax.prune import plan  # pylint: disable=import-outside-toplevel
  return plan.SCHEDULES


def _sources():
  from blockprune_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  return data_lib.SOURCES


# --- the table ----------------------------------------------------------------------------

_NO_LEGACY = object()


@dataclasses.dataclass(frozen=True)
class Key:
  """What the code knows about one key (the fields are the module docstring's list)."""
  rule: Any
  resume: bool = False
  group: bool = False
  legacy: Any = _NO_LEGACY
  needs: str = ""
  paired: bool = False

  @property
  def has_legacy(self) -> bool:
    return self.legacy is not _NO_LEGACY


def _section(needs="", **keys) -> dict:
  return {name: dataclasses.replace(key, needs=needs) for name, key in keys.items()}


# R: a resume may change it; G: runs of a group may differ in it; RG: both.
def _r(rule, **kw):
  return Key(rule, resume=True, **kw)


def _g(rule, **kw):
  return Key(rule, group=True, **kw)


def _rg(rule, **kw):
  return Key(rule, resume=True, group=True, **kw)


KEYS: dict[str, Key] = {
    "seed": _g(Int(0), paired=True), "role": _rg(Choice(ROLES)),
    # model
    "model.init": Key(Choice(("pretrained", "scratch"))), "model.name_or_path": Key(Str()),
    "model.n_layer": Key(POSITIVE), "model.n_embd": Key(POSITIVE), "model.n_head": Key(POSITIVE),
    "model.n_positions": Key(Int(2)), "model.dropout": Key(RATIO),
    "model.dtype": Key(Choice(("float32", "bfloat16"))),
    "model.attention": _r(Choice(("auto", "cudnn", "xla"))),
    # the same model as one scan: its dropout draws differ, so a resume keeps it
    "model.scan_layers": Key(Bool(), legacy=False),
    # base: a group's runs share one base (pipeline.ensure_base), so they may name it each
    "base.steps": _g(COUNT), "base.dir": _rg(Str()), "base.learning_rate": _g(RATE),
    "base.batch_size": _g(COUNT), "base.seed": _g(Int(0)),
    # data
    "data.source": Key(Choice(_sources)), "data.hf_path": Key(Str()), "data.hf_name": Key(Str()),
    "data.text_dir": Key(Str()), "data.seq_len": Key(Int(2)), "data.cache_dir": _r(Str()),
    "data.tokenizer": Key(Str()),
    # eval
    "eval.splits": _r(Splits()), "eval.stride": _r(COUNT), "eval.batch_size": _r(POSITIVE),
    "eval.max_tokens": _r(TokenCount()), "eval.oneshot": _rg(Bool()),
    # zero-shot tasks are scored per run, after its program (tasks.py)
    "eval.tasks": _rg(TaskNames()), "eval.num_fewshot": _rg(COUNT), "eval.task_limit": _rg(COUNT),
    "eval.task_dir": _rg(Str()),
    # train
    "train.steps": Key(COUNT), "train.epochs": Key(Float(0.0, float(INT_MAX))),
    "train.batch_size": Key(POSITIVE), "train.grad_accum": Key(POSITIVE),
    "train.learning_rate": _g(RATE), "train.warmup_steps": _g(COUNT),
    "train.schedule": _g(Choice(("cosine", "linear", "constant"))),
    "train.weight_decay": Key(Float(0.0)), "train.b1": Key(RATIO), "train.b2": Key(RATIO),
    "train.grad_clip": Key(Float(0.0)), "train.log_every": _r(POSITIVE),
    "train.eval_every": _r(COUNT), "train.eval_max_tokens": _r(TokenCount()),
    # recomputing activations or sharding the state changes the program, not the numbers
    "train.remat": _r(Choice(("none", "block"))), "mesh.fsdp": _r(DeviceGroup()),
    # distill
    **_section("distillation", **{
        "distill.teacher": Key(Str()), "distill.temperature": Key(RATE),
        "distill.alpha": Key(Float(0.0, 1.0))}),
    # checkpoint
    "checkpoint.every_steps": _rg(POSITIVE), "checkpoint.keep": _rg(POSITIVE),
    "checkpoint.final_after_s": _rg(Float(0.0)),
    # prune: every key is an input of a batched program (masks, ratios, calibration)
    **_section("pruning", **{
        "prune.method": _g(Choice(("none", *pruning.CRITERIA))),
        "prune.targets": _g(Choice(tuple(pruning.TARGETS))),
        "prune.blocks": _g(POSITIVE),
        "prune.allocation": _g(Choice(allocation.ALLOCATIONS), paired=True),
        "prune.ratios": _g(Numbers(RATIO), paired=True),
        "prune.target": _g(Float(0.0, allocation.MAX_RATIO), paired=True),
        # last minus first block ratio, ratios lie in [0, 1)
        "prune.spread": _g(Float(-1.0, 1.0), paired=True),
        "prune.growth": _g(RATE, paired=True),
        "prune.direction": _g(Choice(("increasing", "decreasing")), paired=True),
        "prune.owl_threshold": _g(RATE), "prune.owl_lambda": _g(Float(0.0, 1.0)),
        "prune.scope": _g(Choice(pruning.SCOPES)), "prune.schedule": _g(Choice(_schedules)),
        "prune.when": _g(Choice(("before_finetune", "after_finetune"))),
        "prune.start": _g(WHEN), "prune.end": _g(WHEN),
        "prune.every": _g(Float(0.0, float(INT_MAX), lo_open=True)), "prune.initial": _g(RATIO),
        "prune.compact": _g(Bool()), "prune.calib_batches": _g(POSITIVE),
        "prune.score_split": _g(Choice(("train", "validation")), legacy="train"),
        "prune.pattern": _g(Pattern(), legacy="unstructured"),
        "prune.sequential": _g(Bool(), legacy=False),
        # the registered methods' own options (sparsegpt_damp, ...), declared with the method
        **{f"prune.{k}": _g(o.rule, legacy=o.legacy) for k, o in pruning.option_keys().items()},
        "prune.sensitivity_ratios": _g(Numbers(Float(0.0, 1.0, lo_open=True, hi_open=True),
                                               nonempty=True, ascending=True), legacy=CURRENT),
        "prune.sensitivity_rounds": _g(POSITIVE, legacy=CURRENT),
        "prune.search_evals": _g(POSITIVE, legacy=CURRENT)}),
    # export, runtime, sweep, wandb: where results go and how a sweep is run
    "export.hf": _rg(Bool()), "runtime.compile_cache": _rg(Str()),
    "sweep.controls": _rg(Bool()), "sweep.batch_runs": _rg(POSITIVE),
    "sweep.side_by_side": _rg(Choice(("auto", "vmap", "map"))),
    "wandb.mode": _rg(Choice(wandb_log.MODES)), "wandb.project": _rg(Str()),
    "wandb.entity": _rg(Str()), "wandb.group": _rg(Str()),
}


@functools.lru_cache(maxsize=None)
def where(**fact) -> frozenset:
  """The keys with the given facts, e.g. where(resume=True), where(needs="pruning")."""
  return frozenset(k for k, key in KEYS.items()
                   if all(getattr(key, f) == v for f, v in fact.items()))


def legacy_values(saved: dict, current: dict) -> dict:
  """The entries a checkpoint written before some keys existed ran with, for keys it lacks."""
  return {k: current[k] if KEYS[k].legacy == CURRENT else KEYS[k].legacy
          for k in current if k not in saved and k in KEYS and KEYS[k].has_legacy}


# --- the reference ------------------------------------------------------------------------

def help_texts(path: str = BASE_CONFIG) -> dict[str, str]:
  """{dotted key: the comment beside its default in configs/base.py}: the one-line meanings
  live next to the defaults users read. A comment line right below that starts in lower case
  continues it."""
  source = open(path).read()
  comments = {t.start[0]: (t.string.lstrip("# ").strip(), t.line.strip().startswith("#"))
              for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT}
  aliases, texts = {"c": ""}, {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign):
      continue
    names = [t for t in node.targets if isinstance(t, ast.Attribute)]
    alias = [t.id for t in node.targets if isinstance(t, ast.Name)]
    if alias:  # `c.model = m = ConfigDict()`: m. stands for model.
      aliases[alias[0]] = names[0].attr + "." if names else ""
      continue
    for t in names:
      if isinstance(t.value, ast.Name) and t.value.id in aliases:
        key, line = aliases[t.value.id] + t.attr, node.end_lineno
        text = [comments[line][0]] if line in comments and not comments[line][1] else []
        while comments.get(line + 1, ("", False))[1] and comments[line + 1][0][:1].islower():
          line += 1
          text.append(comments[line][0])
        texts[key] = " ".join(text)
  return texts


def meanings() -> dict[str, str]:
  """{dotted key: one-line meaning}: base.py's comments and the methods' option texts."""
  return {**help_texts(), **{f"prune.{k}": o.help for k, o in pruning.option_keys().items()}}


def reference(defaults: dict) -> str:
  """docs/config.md: a markdown table of every key (key, default, meaning, and for choices what
  is allowed). `defaults`: config_lib.flatten(configs.base.get_config())."""
  texts = meanings()
  lines = ["# Config keys", "",
           "Generated from `blockprune_jax/keys.py` and `configs/base.py` by "
           "`python -m blockprune_jax.keys > docs/config.md` (tests/test_keys.py checks it is "
           "current). Override any key with `--config.KEY=VALUE`.", "",
           "| key | default | meaning |", "|---|---|---|"]
  order = {k: i for i, k in enumerate(texts)}  # base.py's order, the methods' options last
  for k, default in sorted(defaults.items(), key=lambda kv: order.get(kv[0], len(order))):
    meaning = texts.get(k, "")
    rule = KEYS[k].rule
    if isinstance(rule, Choice):
      meaning += f" (one of: {', '.join(rule.allowed)})"
    lines.append(f"| `{k}` | `{default!r}` | {meaning.replace('|', '/')} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  # pylint: disable=import-outside-toplevel
  from blockprune_jax import config_lib
  from configs import base
  print(reference(config_lib.flatten(base.get_config())), end="")
