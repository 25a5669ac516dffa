"""Every config key fed wrong values: each is refused with one UserError line naming the key.

In-process (config_lib.apply_overrides, then validate.validate): no data, no JAX backend, so the
whole walk takes about a second. Each leaf key of configs/base.py gets the wrong values of its
type (wrong type, negative, zero, huge, NaN, inf, empty, unknown choice, a file where a directory
is meant, a missing directory); values a key legitimately accepts are skipped, each with its
reason in ACCEPTED. Inconsistent combinations of keys are in COMBINATIONS. Two checks go through
the command line (exit 2, one line).
"""
import os

import pytest

from blockprune_jax import config_lib
from blockprune_jax import validate
from blockprune_jax.errors import UserError
from configs import base
import cli
from conftest import REPO, tiny_config

A_FILE = os.path.abspath(__file__)  # an existing file, given where a directory is meant
NO_DIR = "/no/such/dir"
NAN, INF = float("nan"), float("inf")

# Keys naming a directory (or a hub id): they also get a file and a missing directory.
PATH_KEYS = ("model.name_or_path", "base.dir", "data.text_dir", "data.cache_dir",
             "data.tokenizer", "distill.teacher", "runtime.compile_cache", "eval.task_dir")

# Settings under which a key is read at all (each is valid on its own: test_contexts_are_valid).
CONTEXT = {
    "model.name_or_path": {"model.init": "pretrained"},
    "data.text_dir": {"data.source": "text", "data.text_dir": os.path.dirname(A_FILE)},
    "data.hf_path": {"data.source": "hf"},
    "wandb.project": {"wandb.mode": "offline"},
}

# (key, kind) -> why that wrong-looking value is in fact accepted.
_HUB = "a Hugging Face hub id: resolved, or refused in one line, when it is loaded (needs the hub)"
_DIVERGES = ("accepted up front: a run it makes diverge stops with one line (non-finite loss, "
             "train.Diverged; tests/test_train.py) and keeps its last good checkpoint")
ACCEPTED = {
    ("seed", "zero"): "the default seed",
    ("base.seed", "zero"): "the default base seed",
    ("base.steps", "zero"): "no base model (the default)",
    ("base.batch_size", "zero"): "0 means train.batch_size (the default)",
    ("base.dir", "empty"): "'' means <workdir>/base (the default)",
    ("base.dir", "unknown"): "a new directory, created by the run",
    ("base.dir", "missing dir"): "a new directory, created by the run",
    ("base.learning_rate", "huge"): _DIVERGES,
    ("model.dropout", "zero"): "no dropout",
    ("model.name_or_path", "unknown"): _HUB,
    ("data.hf_path", "unknown"): "a hub dataset name: loaded, or refused in one line, when read",
    ("data.hf_name", "empty"): "a dataset without named configurations",
    ("data.hf_name", "unknown"): "a hub dataset configuration: checked when the dataset loads",
    ("data.cache_dir", "empty"): "'' means ~/.cache/blockprune_jax (the default)",
    ("data.cache_dir", "unknown"): "a new directory, created on first use",
    ("data.cache_dir", "missing dir"): "a new directory, created on first use",
    ("data.tokenizer", "empty"): "'' means the checkpoint's own tokenizer (the default)",
    ("data.tokenizer", "unknown"): _HUB,
    ("eval.stride", "zero"): "0 means data.seq_len (the default)",
    ("eval.max_tokens", "zero"): "0 means every token (the default)",
    ("eval.tasks", "empty"): "() scores no zero-shot task (the default)",
    ("eval.num_fewshot", "zero"): "zero-shot (the default)",
    ("eval.task_limit", "zero"): "0 means every document (the default)",
    ("eval.task_dir", "empty"): "'' means the harness's own tasks only (the default)",
    ("train.steps", "zero"): "no fine-tuning by steps (train.epochs decides; the default)",
    ("train.epochs", "zero"): "no fine-tuning by epochs (the default)",
    ("train.learning_rate", "huge"): _DIVERGES,
    ("train.warmup_steps", "zero"): "0 means 5 % of the steps (the default)",
    ("train.weight_decay", "zero"): "no weight decay",
    ("train.weight_decay", "huge"): _DIVERGES,
    ("train.b1", "zero"): "Adam without momentum (RMSProp-like): a valid optimizer",
    ("train.b2", "zero"): "a valid (if odd) second-moment decay",
    ("train.grad_clip", "zero"): "0 turns clipping off",
    ("train.grad_clip", "huge"): "a bound never reached: no clipping",
    ("train.eval_every", "zero"): "0 means only at the end (the default)",
    ("train.eval_max_tokens", "zero"): "0 means the whole validation split (the default)",
    ("checkpoint.final_after_s", "zero"): "always save the last step",
    ("checkpoint.final_after_s", "huge"): "never save the last step beyond the interval saves",
    ("distill.teacher", "empty"): "'' turns distillation off (the default)",
    ("distill.teacher", "unknown"): _HUB,
    ("distill.temperature", "huge"): _DIVERGES,
    ("distill.alpha", "zero"): "plain fine-tuning (the teacher's term weighs 0)",
    ("prune.ratios", "empty"): "() is the default; only allocation explicit / layer read the ratios "
                               "and their length is checked then (COMBINATIONS)",
    ("prune.target", "zero"): "a generated allocation with nothing pruned",
    ("prune.spread", "zero"): "a flat linear allocation (= uniform)",
    ("prune.spread", "negative"): "-1 is a ramp falling from front to back (last minus first)",
    ("prune.growth", "huge"): "accepted up front; a target it cannot reach is one line when the "
                              "allocation is solved (allocation.redistribute_clipped)",
    ("prune.owl_threshold", "huge"): "no weight counts as an outlier: OWL gives every layer the "
                                     "target",
    ("prune.owl_lambda", "zero"): "OWL with no room to move: every layer gets the target",
    ("prune.start", "zero"): "gradual pruning from the first step (the default)",
    ("prune.end", "zero"): "all of the gradual sparsity at the first step",
    ("prune.initial", "zero"): "gradual pruning from a dense model (the default)",
    ("prune.sparsegpt_damp", "huge"): "a strong dampening: SparseGPT tends to magnitude pruning",
    ("mesh.fsdp", "negative"): "-1 shards the state over every device",
    ("runtime.compile_cache", "empty"): "'' means <cache root>/jax_compile (the default)",
    ("runtime.compile_cache", "unknown"): "a new directory, created on first use",
    ("runtime.compile_cache", "missing dir"): "a new directory, created on first use",
    ("wandb.entity", "empty"): "'' means your default W&B entity",
    ("wandb.entity", "unknown"): "any W&B entity name: checked by W&B when a run starts",
    ("wandb.group", "empty"): "'' means the sweep's name (or none)",
    ("wandb.group", "unknown"): "any group name",
    ("wandb.project", "unknown"): "any project name",
}


def wrong_values(key, default):
  """[(kind, value)] of the wrong values for a key whose default is `default`."""
  if isinstance(default, bool):
    return [("wrong type", "maybe"), ("wrong type", 2)]
  if isinstance(default, int):
    return [("wrong type", "abc"), ("negative", -1), ("zero", 0), ("huge", 10**12),
            ("NaN", NAN)]
  if isinstance(default, float):
    return [("wrong type", "abc"), ("negative", -1.0), ("zero", 0.0), ("huge", 1e30),
            ("NaN", NAN), ("inf", INF)]
  if isinstance(default, str):
    values = [("wrong type", 5), ("empty", ""), ("unknown", "no-such-choice")]
    if key in PATH_KEYS:
      values += [("file, not a directory", A_FILE), ("missing dir", NO_DIR)]
    return values
  if key == "eval.splits":
    return [("wrong type", 5), ("empty", ()), ("unknown", ("nope",)),
            ("repeated", ("validation", "validation"))]
  assert isinstance(default, tuple), key
  return [("wrong type", 5), ("wrong element type", ("abc",)), ("empty", ()),
          ("negative", (-0.5,)), ("huge", (1e30,)), ("NaN", (NAN,)), ("inf", (INF,))]


def _cases():
  cases, skipped = [], []
  for key, default in config_lib.flatten(base.get_config()).items():
    for kind, value in wrong_values(key, default):
      (skipped if (key, kind) in ACCEPTED else cases).append((key, kind, value))
  return cases, skipped


CASES, SKIPPED = _cases()

# Combinations no run accepts: (overrides, a key the message must name).
COMBINATIONS = [
    ({"model.n_embd": 30, "model.n_head": 4}, "model.n_embd"),
    ({"data.seq_len": 128}, "data.seq_len"),  # tiny's n_positions is 64
    ({"eval.stride": 40}, "eval.stride"),  # more than data.seq_len
    ({"model.init": "pretrained", "model.name_or_path": ""}, "model.name_or_path"),
    ({"data.source": "text", "data.text_dir": ""}, "data.text_dir"),
    ({"wandb.mode": "offline", "wandb.project": ""}, "wandb.project"),
    ({"prune.method": "magnitude", "prune.allocation": "explicit"}, "prune.ratios"),
    ({"prune.method": "magnitude", "prune.allocation": "explicit", "prune.ratios": (0.5,)},
     "prune.ratios"),
    ({"prune.method": "magnitude", "prune.allocation": "layer", "prune.ratios": (0.1, 0.2, 0.3)},
     "prune.ratios"),
    ({"prune.method": "magnitude", "prune.blocks": 5}, "prune.blocks"),
    ({"prune.method": "magnitude", "prune.schedule": "gradual"}, "prune.schedule"),
    ({"prune.method": "magnitude", "prune.schedule": "gradual", "train.steps": 10,
      "prune.start": 0.6, "prune.end": 0.2}, "prune.start"),
    ({"prune.method": "magnitude", "prune.schedule": "gradual", "train.steps": 10,
      "prune.initial": 0.8, "prune.target": 0.5}, "prune.initial"),
    ({"prune.method": "neurons", "prune.targets": "attn"}, "prune.targets"),
    ({"prune.method": "wanda", "prune.scope": "global"}, "prune.scope"),
    ({"prune.method": "magnitude", "prune.sequential": True}, "prune.sequential"),
    ({"prune.method": "sparsegpt", "prune.schedule": "gradual", "train.steps": 10},
     "prune.method"),
    ({"prune.method": "magnitude", "prune.pattern": "2:4", "prune.allocation": "sensitivity"},
     "prune.allocation"),
    ({"prune.method": "magnitude", "prune.pattern": "2:4", "prune.target": 0.3},
     "prune.pattern"),
    ({"prune.method": "random", "prune.pattern": "2:4"}, "prune.pattern"),
    ({"prune.method": "magnitude", "prune.allocation": "sensitivity",
      "prune.score_split": "validation", "eval.splits": ("validation",)}, "prune.score_split"),
]


def _refused(overrides, key):
  """Asserts overrides -> one UserError line (from apply_overrides or validate) naming `key`."""
  with pytest.raises(UserError) as e:
    validate.validate(config_lib.apply_overrides(tiny_config(), overrides))
  message = str(e.value)
  assert key in message, message
  assert "\n" not in message and "Traceback" not in message, message


def test_every_key_has_a_rule_and_every_skip_a_key():
  keys = set(config_lib.flatten(base.get_config()))
  assert keys == set(validate.RULES), "add a rule to validate.RULES for each new config key"
  assert {k for k, _ in ACCEPTED} <= keys
  kinds = {(k, kind) for k, d in config_lib.flatten(base.get_config()).items()
           for kind, _ in wrong_values(k, d)}
  assert set(ACCEPTED) <= kinds, set(ACCEPTED) - kinds  # no stale reason


def test_contexts_and_shipped_configs_are_valid():
  validate.validate(tiny_config())
  for context in CONTEXT.values():
    validate.validate(config_lib.apply_overrides(tiny_config(), context))
  validate.validate(base.get_config())


SHIPPED = sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_and_sweep_run_is_valid(name):
  """The rules are not stricter than what the project itself runs."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  from blockprune_jax import sweep  # pylint: disable=import-outside-toplevel
  path = os.path.join(REPO, "configs", name)
  spec = importlib.util.spec_from_file_location(f"_shipped_{name[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  runs = sweep.load_get_sweep(path)
  for run in sweep.expand_sweep(config, None, runs) if runs else [{}]:
    validate.validate(config_lib.apply_overrides(config, run))


@pytest.mark.parametrize("key,kind,value", CASES, ids=[f"{k}:{kind}" for k, kind, _ in CASES])
def test_wrong_value_is_refused_naming_the_key(key, kind, value):
  del kind
  _refused({**CONTEXT.get(key, {}), key: value}, key)


@pytest.mark.parametrize("overrides,key", COMBINATIONS,
                         ids=[",".join(o) for o, _ in COMBINATIONS])
def test_inconsistent_combination_is_refused(overrides, key):
  _refused(overrides, key)


def test_accepted_values_are_accepted():
  """The skip table is honest: each skipped value passes validation (in its context)."""
  for key, kind, value in SKIPPED:
    config = config_lib.apply_overrides(tiny_config(), {**CONTEXT.get(key, {}), key: value})
    validate.validate(config)


def test_fuzz_count():
  combos = len(COMBINATIONS)
  print(f"\nfuzz: {len(CASES)} wrong values over {len(config_lib.flatten(base.get_config()))} "
        f"keys + {combos} inconsistent combinations = {len(CASES) + combos} bad inputs refused; "
        f"{len(SKIPPED)} accepted values skipped (ACCEPTED)")
  assert len(CASES) + combos >= 300


# --- the same through the command line ---------------------------------------------------

def _cli(tmp_path, *flags):
  return cli.run(cli.command(tmp_path / "w", *flags), timeout=120)


@pytest.mark.parametrize("flag,line", [
    ("--config.train.batch_size=0", "error: train.batch_size=0 must be an integer >= 1"),
    ("--config.prune.target=nan", "error: prune.target=nan must be a number in [0, 0.99]"),
    ("--config.train.stps=3", "error: unknown config key 'train.stps' ('stps' is not in train; "
                              "did you mean 'train.steps'?)"),
])
@pytest.mark.slow
def test_cli_bad_value_is_one_line_and_exit_2(tmp_path, flag, line):
  r = _cli(tmp_path, flag)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [line]
  assert not os.path.exists(tmp_path / "w")  # refused before anything was written
