"""Every config key checked before any work starts: type, range or choice, then combinations.

`validate(config)` raises one `UserError` line naming the key, its value and what is allowed,
e.g. `train.batch_size=0 must be an integer >= 1`. It reads no data and starts no JAX backend,
so a bad value fails in milliseconds rather than after a base model has trained. What can only
be known later (a hub id, a pretrained model's n_layer, the device count) is checked where it is
used, also in one line.

RULES holds one rule per key of configs/base.py (tests/test_fuzz.py feeds every key wrong
values and checks each is refused); a key without a rule gets a type check only.
"""
import math
import os

from blockprune_jax import allocation
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import plan as plan_lib
from blockprune_jax import pruning
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax import wandb_log
from blockprune_jax.errors import UserError

# XLA shapes, our int32 step / data-position counters and jax.random seeds hold no more.
INT_MAX = 2**31 - 1
ROLES = ("experiment", "base", "control")  # base: pipeline.base_config; control: sweep controls

# Allowed values of the keys that name a choice; the pruning ones come from their registries.
CHOICES = {
    "role": ROLES,
    "model.init": ("pretrained", "scratch"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attention": ("auto", "cudnn", "xla"),
    "data.source": data_lib.SOURCES,
    "prune.method": ("none", *pruning.CRITERIA),
    "prune.targets": tuple(pruning.TARGETS),
    "prune.allocation": allocation.ALLOCATIONS,
    "prune.scope": pruning.SCOPES,
    "prune.schedule": plan_lib.SCHEDULES,
    "prune.when": ("before_finetune", "after_finetune"),
    "prune.direction": ("increasing", "decreasing"),
    "train.schedule": ("cosine", "linear", "constant"),
    "train.remat": ("none", "block"),
    "wandb.mode": wandb_log.MODES,
    "sweep.side_by_side": ("auto", "vmap", "map"),
}


# --- rules for one value ------------------------------------------------------------------

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


class Int:
  """An integer in lo..hi."""

  def __init__(self, lo=0, hi=INT_MAX):
    self.lo, self.hi = lo, hi

  def what(self, v=None) -> str:
    if self.hi != INT_MAX:
      return f"an integer in {self.lo}..{self.hi}"
    too_big = _is_number(v) and v > self.hi
    return f"an integer >= {self.lo}" + (f" and at most 2**31 - 1 ({INT_MAX})" if too_big else "")

  def check(self, key, v):
    if not _is_int(v) or not self.lo <= v <= self.hi:
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
    if not _is_number(v) or not math.isfinite(v):
      return False
    above = v > self.lo if self.lo_open else v >= self.lo
    below = v < self.hi if self.hi_open else v <= self.hi
    return above and below

  def check(self, key, v):
    if not self.ok(v):
      raise UserError(f"{key}={v!r} must be {self.what()}")


class Choice:
  """One of CHOICES[key] (the message is the one the README quotes)."""

  def check(self, key, v):
    allowed = CHOICES[key]
    if v not in allowed:
      raise UserError(f"{key}={v!r} is not one of {', '.join(allowed)}")


class Str:
  """Any text (paths and names: combinations check what they must hold)."""

  def check(self, key, v):
    if not isinstance(v, str):
      raise UserError(f"{key}={v!r} must be text (a string)")


class Bool:

  def check(self, key, v):
    if not isinstance(v, bool):
      raise UserError(f"{key}={v!r} must be true or false")


class Pattern:
  """prune.pattern: `unstructured` or N:M (pruning.parse_pattern says why not)."""

  def check(self, key, v):
    Str().check(key, v)
    pruning.parse_pattern(v)


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


class Splits:
  """eval.splits: names from data.SPLITS (also 'validation,test' in one element), no repeats."""

  def check(self, key, v):
    if not isinstance(v, (tuple, list)) or not all(isinstance(s, str) for s in v):
      raise UserError(f"{key}={v!r} must be a tuple of split names "
                      f"({', '.join(data_lib.SPLITS)})")
    names = [s.strip() for item in v for s in item.split(",") if s.strip()]
    if not names:
      raise UserError(f"{key}={tuple(v)!r} names no split: give one or more of "
                      f"{', '.join(data_lib.SPLITS)}")
    for s in names:
      if s not in data_lib.SPLITS:
        raise UserError(f"{key}: {s!r} is not one of {', '.join(data_lib.SPLITS)}")
    if len(set(names)) < len(names):
      raise UserError(f"{key}={tuple(v)!r} names a split twice")


class TokenCount:
  """0 (everything) or at least 2 tokens (a window scores the tokens after its first)."""

  def check(self, key, v):
    Int(0).check(key, v)
    if v == 1:
      raise UserError(f"{key}=1 must be 0 (all tokens) or at least 2 (one scored token)")


POSITIVE = Int(1)
COUNT = Int(0)
RATIO = Float(0.0, 1.0, hi_open=True)
RATE = Float(0.0, lo_open=True)  # learning rates, temperatures: > 0
class DeviceGroup(Int):
  """mesh.fsdp: -1 (every device) or a positive group size; whether it divides the device count
  is checked where the devices are known (parallel.fsdp_size)."""

  def check(self, key, v):
    if not _is_int(v) or not (v == -1 or 1 <= v <= INT_MAX):
      raise UserError(f"{key}={v!r} must be -1 (every device) or a positive integer that "
                      "divides the device count (1 = replicated)")


# prune.start / end / every: a fraction of the run (<= 1) or a step count (> 1).
WHEN = Float(0.0, float(INT_MAX))

RULES = {
    "seed": Int(0), "role": Choice(),
    # model
    "model.init": Choice(), "model.name_or_path": Str(),
    "model.n_layer": POSITIVE, "model.n_embd": POSITIVE, "model.n_head": POSITIVE,
    "model.n_positions": Int(2), "model.dropout": RATIO, "model.dtype": Choice(),
    "model.attention": Choice(),
    # base
    "base.steps": COUNT, "base.dir": Str(), "base.learning_rate": RATE, "base.batch_size": COUNT,
    "base.seed": Int(0),
    # data
    "data.source": Choice(), "data.hf_path": Str(), "data.hf_name": Str(),
    "data.text_dir": Str(), "data.seq_len": Int(2), "data.cache_dir": Str(),
    "data.tokenizer": Str(),
    # eval
    "eval.splits": Splits(), "eval.stride": COUNT, "eval.batch_size": POSITIVE,
    "eval.max_tokens": TokenCount(), "eval.oneshot": Bool(),
    # train
    "train.steps": COUNT, "train.epochs": Float(0.0, float(INT_MAX)),
    "train.batch_size": POSITIVE, "train.grad_accum": POSITIVE, "train.learning_rate": RATE,
    "train.warmup_steps": COUNT, "train.schedule": Choice(), "train.weight_decay": Float(0.0),
    "train.b1": RATIO, "train.b2": RATIO, "train.grad_clip": Float(0.0),
    "train.log_every": POSITIVE, "train.eval_every": COUNT, "train.eval_max_tokens": TokenCount(),
    "train.remat": Choice(),
    # mesh
    "mesh.fsdp": DeviceGroup(),
    # distill
    "distill.teacher": Str(), "distill.temperature": RATE, "distill.alpha": Float(0.0, 1.0),
    # checkpoint
    "checkpoint.every_steps": POSITIVE, "checkpoint.keep": POSITIVE,
    "checkpoint.final_after_s": Float(0.0),
    # prune
    "prune.method": Choice(), "prune.targets": Choice(), "prune.blocks": POSITIVE,
    "prune.allocation": Choice(), "prune.ratios": Numbers(RATIO),
    "prune.target": Float(0.0, allocation.MAX_RATIO),
    "prune.spread": Float(-1.0, 1.0),  # last minus first block ratio, ratios lie in [0, 1)
    "prune.growth": RATE, "prune.direction": Choice(), "prune.owl_threshold": RATE,
    "prune.owl_lambda": Float(0.0, 1.0), "prune.scope": Choice(), "prune.schedule": Choice(),
    "prune.when": Choice(), "prune.start": WHEN, "prune.end": WHEN,
    "prune.every": Float(0.0, float(INT_MAX), lo_open=True), "prune.initial": RATIO,
    "prune.compact": Bool(), "prune.calib_batches": POSITIVE, "prune.pattern": Pattern(),
    "prune.sequential": Bool(), "prune.sparsegpt_damp": RATE,
    "prune.sparsegpt_blocksize": POSITIVE,
    "prune.sensitivity_ratios": Numbers(Float(0.0, 1.0, lo_open=True, hi_open=True),
                                        nonempty=True, ascending=True),
    "prune.sensitivity_rounds": POSITIVE, "prune.search_evals": POSITIVE,
    # export, runtime, sweep, wandb
    "export.hf": Bool(), "runtime.compile_cache": Str(),
    "sweep.controls": Bool(), "sweep.batch_runs": POSITIVE,
    "sweep.side_by_side": Choice(),
    "wandb.mode": Choice(), "wandb.project": Str(), "wandb.entity": Str(), "wandb.group": Str(),
}


def _type_rule(value):
  """The rule of a key RULES does not list: its value's type, nothing more."""
  if isinstance(value, bool):
    return Bool()
  if isinstance(value, str):
    return Str()
  if _is_int(value):
    return Int(-INT_MAX)
  if isinstance(value, float):
    return Float()
  return None


# --- the whole config ----------------------------------------------------------------------

def validate(config) -> None:
  """Raises one UserError line for the first key (or combination of keys) no run accepts."""
  for key, value in config_lib.flatten(config).items():
    rule = RULES.get(key) or _type_rule(value)
    if rule is not None:
      rule.check(key, value)
  _check_paths(config)
  _check_model_and_data(config)
  _check_training(config)
  if config.prune.method != "none":
    _check_pruning(config)
  if config.wandb.mode != "disabled" and not config.wandb.project:
    raise UserError(f"wandb.project='' with wandb.mode={config.wandb.mode}: name a project")


def _looks_like_path(text: str) -> bool:
  """Hub ids are "name" or "org/name"; anything else is meant as a local path."""
  return text.startswith(("/", ".", "~")) or text.count("/") > 1


def _check_directory_key(key, value, must_exist=False, or_hub_id=False):
  """`value` of `key` names a directory: never a file; if `must_exist`, an existing one (for
  `or_hub_id` keys, only when it looks like a path: a hub id is checked when downloaded)."""
  path = os.path.expanduser(value)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(f"{key}={value!r} is a file, not a directory: give a directory"
                    + (" or a Hugging Face hub id" if or_hub_id else ""))
  exists = os.path.isdir(path)
  if must_exist and not exists and (not or_hub_id or _looks_like_path(value)):
    raise UserError(f"{key}={value!r}: no such directory"
                    + (" (nor a Hugging Face hub id such as gpt2)" if or_hub_id else ""))
  if exists and must_exist and not os.access(path, os.R_OK | os.X_OK):
    raise UserError(f"{key}={value!r} is not readable: check its permissions")


def _check_paths(config):
  """Paths of the config: directories where directories are meant, present where needed."""
  if config.model.init == "pretrained":
    if not config.model.name_or_path:
      raise UserError("model.name_or_path='' with model.init=pretrained: give a hub id (gpt2), "
                      "a Hugging Face directory or a workdir with export/, or set "
                      "--config.model.init=scratch")
    _check_directory_key("model.name_or_path", config.model.name_or_path, True, True)
  if config.distill.teacher:
    _check_directory_key("distill.teacher", config.distill.teacher, True, True)
  if config.data.tokenizer not in ("", tok_lib.OFFLINE, tok_lib.BYTES):
    _check_directory_key("data.tokenizer", config.data.tokenizer, True, True)
  if config.data.source == "text":
    if not config.data.text_dir:
      raise UserError("data.text_dir='' with data.source=text: pass --config.data.text_dir=DIR, "
                      "a folder with wiki.{train,valid,test}.{raw,tokens} or "
                      "{train,validation,test}.txt")
    _check_directory_key("data.text_dir", config.data.text_dir, must_exist=True)
    _check_text_files(config.data.text_dir)
  if config.data.source == "hf" and not config.data.hf_path:
    raise UserError("data.hf_path='' with data.source=hf: name a dataset (wikitext), or use "
                    "data.source=text / builtin")
  for key in ("data.cache_dir", "base.dir"):
    if config_lib.lookup(config, key):
      _check_directory_key(key, config_lib.lookup(config, key))
  if config.runtime.compile_cache not in ("", "off"):
    _check_directory_key("runtime.compile_cache", config.runtime.compile_cache)
  cache_env = os.environ.get("BLOCKPRUNE_CACHE", "")
  if cache_env and not config.data.cache_dir:
    path = os.path.expanduser(cache_env)
    if os.path.lexists(path) and not os.path.isdir(path):
      raise UserError(f"$BLOCKPRUNE_CACHE={cache_env!r} is a file, not a directory: point it at "
                      "a directory (or set --config.data.cache_dir)")


def _check_text_files(text_dir):
  """The file data.py would read for each split (the first present of TEXT_FILES) is readable."""
  path = os.path.expanduser(text_dir)
  for names in data_lib.TEXT_FILES.values():
    found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if found and not os.access(found[0], os.R_OK):
      raise UserError(f"data.text_dir: {found[0]} is not readable: check its permissions")


def _check_model_and_data(config):
  m, seq_len = config.model, config.data.seq_len
  stride = config.eval.stride or seq_len
  if not 0 < stride <= seq_len:
    raise UserError(f"eval.stride={config.eval.stride} must be in 1..data.seq_len "
                    f"({seq_len}); 0 means seq_len")
  if m.init != "scratch":
    return  # a checkpoint brings its own shape, checked when it is loaded
  if m.n_embd % m.n_head:
    raise UserError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
  if seq_len > m.n_positions:
    raise UserError(f"data.seq_len={seq_len} exceeds model.n_positions={m.n_positions}: lower "
                    "--config.data.seq_len or raise --config.model.n_positions")


def _check_training(config):
  t = config.train
  if t.batch_size * t.grad_accum > INT_MAX:
    raise UserError(f"train.batch_size * train.grad_accum = {t.batch_size * t.grad_accum} "
                    f"sequences per step is more than {INT_MAX}")


def _fine_tunes(config) -> bool:
  return config.train.steps > 0 or config.train.epochs > 0


def _check_pruning(config):
  p, m = config.prune, config.model
  crit = pruning.criterion(p.method)
  pattern = pruning.parse_pattern(p.pattern)
  ratios = {"explicit": p.ratios, "layer": p.ratios, "uniform": (p.target,)}.get(p.allocation, ())
  pruning.check_method(p.method, targets=p.targets, scope=p.scope, pattern=pattern,
                       ratios=ratios)
  if (crit.sequential_only or p.sequential) and crit.calibration == "":
    raise UserError(f"prune.sequential=True with prune.method={p.method}: only data-aware "
                    "methods (wanda, sparsegpt) calibrate layer by layer; set it to False")
  if crit.sequential_only and p.schedule == "gradual":
    raise UserError(f"prune.method={p.method} is one-shot (it rewrites the kept weights once "
                    "from calibration data): set --config.prune.schedule=oneshot")
  if pattern and p.allocation in allocation.MEASURED:
    raise UserError(f"prune.allocation={p.allocation} chooses free ratios, but prune.pattern="
                    f"{p.pattern} allows only 0 or N/M per block: use allocation explicit")
  scratch = m.init == "scratch"
  if scratch and p.blocks > m.n_layer:
    raise UserError(f"prune.blocks={p.blocks} must be between 1 and model.n_layer={m.n_layer}")
  want = {"explicit": (p.blocks, "block (prune.blocks)"),
          "layer": (m.n_layer if scratch else None, "layer (model.n_layer)")}.get(p.allocation)
  if want and want[0] is not None and len(p.ratios) != want[0]:
    raise UserError(f"prune.ratios has {len(p.ratios)} values; allocation {p.allocation} expects "
                    f"{want[0]}, one per {want[1]}: set --config.prune.ratios to {want[0]} ratios")
  if p.schedule == "gradual":
    _check_gradual(config)


def _check_gradual(config):
  p = config.prune
  if not _fine_tunes(config):
    raise UserError("prune.schedule=gradual prunes during fine-tuning: set train.steps or "
                    "train.epochs, or use prune.schedule=oneshot")
  if (p.start <= 1) == (p.end <= 1) and p.start > p.end:
    raise UserError(f"prune.start={p.start} must not come after prune.end={p.end}")
  if p.pattern != "unstructured":
    raise UserError(f"prune.pattern={p.pattern} with prune.schedule=gradual: GMP's ratios grow "
                    "through values that are not 0 or N/M; use prune.schedule=oneshot")
  if p.sequential:
    raise UserError("prune.sequential=True with prune.schedule=gradual: layer-by-layer "
                    "calibration prunes once; set prune.sequential=False or prune.schedule=oneshot")
  generated = p.allocation not in ("explicit", "layer") + allocation.MEASURED
  if generated and p.initial > p.target:
    raise UserError(f"prune.initial={p.initial} exceeds prune.target={p.target}: masks only "
                    "grow, so the gradual schedule must start below its target")
