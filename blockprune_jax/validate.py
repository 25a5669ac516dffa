"""Every config key checked before any work starts: its rule, then combinations of keys.

`validate(config)` raises one `UserError` line naming the key, its value and what is allowed,
e.g. `train.batch_size=0 must be an integer >= 1`. It reads no data and starts no JAX backend,
so a bad value fails in milliseconds rather than after a base model has trained. What can only
be known later (a hub id, a pretrained model's n_layer, the device count) is checked where it is
used, also in one line.
"""
import os

from blockprune_jax.prune import allocation
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import keys
from blockprune_jax.prune import pruning
from blockprune_jax import rules
from blockprune_jax import tasks as tasks_lib
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax.errors import UserError

RULES = {k: key.rule for k, key in keys.KEYS.items()}  # tests/test_fuzz.py tries each
INT_MAX = rules.INT_MAX


def _type_rule(value):
  """The rule of a key a config file added (not in RULES): its value's type, nothing more."""
  kinds = ((bool, rules.Bool()), (str, rules.Str()), (int, rules.Int(-INT_MAX)),
           (float, rules.Float()))
  return next((rule for kind, rule in kinds if isinstance(value, kind)), None)


def validate(config) -> None:
  """Raises one UserError line for the first key (or combination of keys) no run accepts."""
  for key, value in config_lib.flatten(config).items():
    rule = RULES.get(key) or _type_rule(value)
    if rule is not None:
      rule.check(key, value)
  _check_paths(config)
  _check_model_and_data(config)
  t = config.train
  if t.batch_size * t.grad_accum > INT_MAX:
    raise UserError(f"train.batch_size * train.grad_accum = {t.batch_size * t.grad_accum} "
                    f"sequences per step is more than {INT_MAX}")
  if config.prune.method != "none":
    _check_pruning(config)
  if config.eval.task_dir:
    _check_directory_key("eval.task_dir", config.eval.task_dir, must_exist=True)
  if tasks_lib.task_names(config):  # only then: indexing the harness's tasks takes seconds
    tasks_lib.check_task_names(config)
  if config.wandb.mode != "disabled" and not config.wandb.project:
    raise UserError(f"wandb.project='' with wandb.mode={config.wandb.mode}: name a project")


def _check_directory_key(key, value, must_exist=False, or_hub_id=False):
  """`value` of `key` names a directory: never a file; if `must_exist`, an existing one (for
  `or_hub_id` keys, only when it looks like a path: a hub id is checked when downloaded)."""
  path = os.path.expanduser(value)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise UserError(f"{key}={value!r} is a file, not a directory: give a directory"
                    + (" or a Hugging Face hub id" if or_hub_id else ""))
  exists = os.path.isdir(path)
  if must_exist and not exists and (not or_hub_id or tok_lib.looks_like_path(value)):
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


def _check_pruning(config):
  p, m = config.prune, config.model
  crit = pruning.criterion(p.method)
  pattern = pruning.parse_pattern(p.pattern)
  ratios = {"explicit": p.ratios, "layer": p.ratios, "uniform": (p.target,)}.get(p.allocation, ())
  pruning.check_method(p.method, targets=p.targets, scope=p.scope, pattern=pattern,
                       ratios=ratios)
  if (crit.sequential_only or p.sequential) and crit.calibration == "":
    aware = ", ".join(n for n, c in pruning.CRITERIA.items() if c.calibration)
    raise UserError(f"prune.sequential=True with prune.method={p.method}: only data-aware "
                    f"methods ({aware}) calibrate layer by layer; set it to False")
  if crit.sequential_only and p.schedule == "gradual":
    raise UserError(f"prune.method={p.method} is one-shot (it rewrites the kept weights once "
                    "from calibration data): set --config.prune.schedule=oneshot")
  if pattern and p.allocation in allocation.MEASURED:
    raise UserError(f"prune.allocation={p.allocation} chooses free ratios, but prune.pattern="
                    f"{p.pattern} allows only 0 or N/M per block: use allocation explicit")
  if (p.allocation in allocation.MEASURED and p.score_split == "validation"
      and "test" not in config.eval.splits):
    raise UserError(f"prune.score_split=validation chooses the allocation on the validation split, "
                    f"so eval.splits={tuple(config.eval.splits)} reports no held-out perplexity: "
                    "add test (--config.eval.splits=validation,test)")
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
  if config.train.steps <= 0 and config.train.epochs <= 0:
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
