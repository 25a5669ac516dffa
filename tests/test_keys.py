"""The keys declared in configs/base.py against the config it builds, the checkpoints they must
still resume, and the generated reference docs/config.md."""
import os
import re

from blockprune_jax import batched
from blockprune_jax import config_lib
from blockprune_jax import keys
from blockprune_jax import rules
from blockprune_jax import train
from blockprune_jax import validate
from configs import base
from conftest import REPO

# The keys of configs/base.py when resuming was first checked: every checkpoint
# holds them. A key that changes the trajectory and is not here was added later, so a checkpoint
# may lack it: the table must say what such a checkpoint ran with (its legacy value). Frozen.
IN_EVERY_CHECKPOINT = set("""
base.batch_size base.dir base.learning_rate base.seed base.steps checkpoint.every_steps
checkpoint.keep data.cache_dir data.hf_name data.hf_path data.seq_len data.source
data.text_dir data.tokenizer distill.alpha distill.teacher distill.temperature eval.batch_size
eval.max_tokens eval.splits eval.stride export.hf model.attention model.dropout model.dtype
model.init model.n_embd model.n_head model.n_layer model.n_positions model.name_or_path
prune.allocation prune.blocks prune.calib_batches prune.compact prune.direction prune.end
prune.every prune.growth prune.initial prune.method prune.owl_lambda prune.owl_threshold
prune.ratios prune.schedule prune.scope prune.spread prune.start prune.target prune.targets
prune.when role seed train.b1 train.b2 train.batch_size train.epochs train.eval_every
train.eval_max_tokens train.grad_accum train.grad_clip train.learning_rate train.log_every
train.schedule train.steps train.warmup_steps train.weight_decay""".split())
DOCS = os.path.join(REPO, "docs", "config.md")


def _defaults():
  return config_lib.flatten(base.get_config())


def test_the_table_covers_every_key_of_base_and_nothing_else():
  missing = sorted(set(_defaults()) - set(keys.KEYS))
  extra = sorted(set(keys.KEYS) - set(_defaults()))
  assert not missing, f"declare {missing} in configs/base.py KEYS"
  assert not extra, f"{extra} are in keys.KEYS but not in configs/base.py"
  assert set(validate.RULES) == set(keys.KEYS)


def test_every_key_that_changes_the_trajectory_has_a_legacy_value():
  for k, key in keys.KEYS.items():
    if not key.resume and k not in IN_EVERY_CHECKPOINT:
      assert key.has_legacy, (f"{k} changes the trajectory and older checkpoints lack it: give it "
                              "legacy= in configs/base.py (the value they ran with, or CURRENT)")
  assert IN_EVERY_CHECKPOINT <= set(keys.KEYS)  # no key of old checkpoints is gone


def test_an_old_checkpoint_resumes_with_legacy_values_and_not_under_other_values():
  config = config_lib.apply_overrides(base.get_config(), {"prune.method": "sparsegpt"})
  current = train.resume_keys(config)
  old = {k: v for k, v in current.items() if k in IN_EVERY_CHECKPOINT}
  legacy = keys.legacy_values(old, current)
  assert set(legacy) == set(current) - set(old)
  assert legacy["prune.pattern"] == "unstructured" and legacy["prune.sequential"] is False
  assert legacy["prune.sparsegpt_damp"] == current["prune.sparsegpt_damp"]
  train.check_resumable(old, current, "w")  # resumes
  changed = dict(current, **{"prune.pattern": "2:4"})
  try:
    train.check_resumable(old, changed, "w")
  except Exception as e:  # pylint: disable=broad-except
    assert "prune.pattern" in str(e)
  else:
    raise AssertionError("a checkpoint that ran unstructured resumed under prune.pattern=2:4")


def test_the_derived_lists_keep_their_meaning():
  dense = train.resume_keys(base.get_config())
  assert not any(k.startswith(("prune.", "distill.", "checkpoint.", "wandb.")) for k in dense)
  assert "train.learning_rate" in dense and "train.log_every" not in dense
  assert {"seed", "role", "train.learning_rate", "prune.method", "base.dir"} <= batched.FREE_KEYS
  assert not {"train.steps", "model.n_layer", "eval.splits"} & batched.FREE_KEYS
  assert keys.where(needs="pruning") == {k for k in keys.KEYS if k.startswith("prune.")}


def test_every_key_has_a_one_line_meaning_and_base_lists_every_choice_it_names():
  meanings = {k: key.help for k, key in keys.KEYS.items()}
  assert all(meanings.values()), [k for k, text in meanings.items() if not text]
  assert all("\n" not in text for text in meanings.values())
  for k, text in meanings.items():
    rule = keys.KEYS[k].rule
    if isinstance(rule, rules.Choice) and " | " in text:  # a meaning that lists the choices
      named = set(re.findall(r"[\w:]+", text))
      assert set(rule.allowed) <= named, f"configs/base.py's meaning of {k} misses " \
          f"{sorted(set(rule.allowed) - named)}"


def test_docs_config_md_is_current():
  want = keys.reference()
  assert os.path.exists(DOCS) and open(DOCS).read() == want, (
      "docs/config.md is stale: python -m blockprune_jax.keys > docs/config.md")
  assert "`prune.sparsegpt_damp` | `0.01` |" in want and "sensitivity" in want
