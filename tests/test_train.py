"""Fine-tuning: learning, device-count independence, distillation, kill / resume."""
import contextlib
import json
import os
import signal

import jax
import ml_collections
import numpy as np
import pytest

from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax import flops
from blockprune_jax import pipeline
from blockprune_jax import update
from blockprune_jax import train
import cli
from conftest import tiny_config, tiny_training



@pytest.mark.slow
def test_training_from_scratch_halves_validation_perplexity(tmp_path):
  config = tiny_config(train__steps=60, train__batch_size=16, eval__max_tokens=4000)
  before = pipeline.run(tiny_config(eval__max_tokens=4000), str(tmp_path / "untrained"))
  after = pipeline.run(config, str(tmp_path / "trained"))
  assert after["perplexity"]["validation"] < 0.5 * before["perplexity"]["validation"]
  assert after["train"]["steps"] == 60 and after["train"]["final_loss"] < 3.5
  lines = open(tmp_path / "trained" / "metrics.jsonl").read().splitlines()
  assert len([l for l in lines if '"train"' in l]) == 60


@contextlib.contextmanager
def _no_implicit_host_reads():
  """JAX's device-to-host transfer guard, plus what it does not check on the CPU backend:
  reading a jax.Array's value into Python or NumPy (int(), float(), bool(), np.asarray, ...)
  raises inside this scope."""
  from jax._src import array as array_lib  # pylint: disable=import-outside-toplevel
  cls = array_lib.ArrayImpl
  names = ("__int__", "__float__", "__bool__", "__index__", "__array__", "tolist", "item")
  saved = {n: cls.__dict__[n] for n in names}

  def refuse(*args, **kwargs):
    raise AssertionError("implicit device-to-host read in a steady-state step")
  try:
    for n in names:
      setattr(cls, n, refuse)
    with jax.transfer_guard_device_to_host("disallow"):
      yield
  finally:
    for n, f in saved.items():
      setattr(cls, n, f)


@pytest.mark.slow
def test_steady_state_steps_never_wait_for_the_device(tmp_path, monkeypatch):
  with pytest.raises(AssertionError, match="implicit"):  # the check itself can fail
    with _no_implicit_host_reads():
      int(jax.numpy.ones((), np.int32) + 1)
  entered = []

  @contextlib.contextmanager
  def guard():
    entered.append(1)
    with _no_implicit_host_reads():
      yield
  monkeypatch.setattr(train, "steady_state_guard", guard)
  # Gradual pruning, logging every 3 steps and a checkpoint every 4: the host work between
  # steps happens outside the guarded part, the steps themselves inside it.
  r = pipeline.run(tiny_config(train__steps=9, train__log_every=3, checkpoint__every_steps=4,
                               prune__method="magnitude", prune__schedule="gradual",
                               prune__every=2), str(tmp_path / "run"))
  assert len(entered) == 9 and r["train"]["steps"] == 9
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [l["step"] for l in lines if l["split"] == "train"] == [3, 6, 9]
  assert not any("mfu" in l for l in lines)  # a CPU's peak is unknown: the lines stay as they were


def test_step_lines_report_mfu_where_the_device_peak_is_known(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(flops.PEAK_FLOPS, "cpu", 1e9)  # a fake peak for the CPU devices
  r = pipeline.run(tiny_config(train__steps=4, train__log_every=2), str(tmp_path / "run"))
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  train_lines = [l for l in lines if l["split"] == "train"]
  # Hand count of the tiny model (2 blocks, d = 32, 257 tokens): 12 d^2 + 13 d weights per block,
  # the token table and the final layer norm; 6 N + 12 L d T per trained token at T = 32.
  d, n_dev = 32, r["runtime"]["devices"]
  n = 2 * (12 * d * d + 13 * d) + 257 * d + 2 * d
  per_token = 6 * n + 12 * 2 * d * 32
  for l in train_lines:
    assert l["mfu"] == pytest.approx(l["tokens_per_s"] * per_token / (n_dev * 1e9), rel=1e-9)
  steps = [l for l in capsys.readouterr().err.splitlines() if "] step " in l]
  assert len(steps) == 2 and all(" tok/s  mfu " in l for l in steps), steps


# Seed 0's GPT-2 init has an MLP unit in layer 0 whose first gradients are ~0: Adam's
# g / sqrt(v) turns the rounding differences of a 1- vs 4-device pmean there into +-lr steps, a
# property of Adam, not of the data parallelism this file checks.
INIT_SEED = 1


def _run_steps(mesh, steps=4, teacher=None, alpha=0.0, temperature=2.0, student_params=None):
  cfg, t_cfg, opt, lrs = tiny_training(dropout=0.0, learning_rate=1e-2)
  params = student_params or model_lib.init_params(cfg, INIT_SEED)
  state = parallel.replicate(train.init_state(params, opt, {}, seed=0), mesh, donatable=True)
  step = train.make_train_step(cfg, train.optimizer_settings(t_cfg), mesh,
                               teacher_cfg=cfg if teacher else None, alpha=alpha,
                               temperature=temperature)
  # The same batch every step, so a few steps visibly lower its loss.
  data = np.repeat(np.random.RandomState(0).randint(0, 257, (1, 2, 8, 17)), steps, 0).astype(np.int32)
  teacher_params = parallel.replicate(teacher, mesh) if teacher else {}
  losses, kls = [], []
  for s in range(steps):
    state, m = step(state, parallel.shard_batch(data[s], mesh, axis=1), teacher_params, lrs[s])
    losses.append(float(m["loss"]))
    kls.append(float(m["kl"]))
  return jax.device_get(state["params"]), losses, kls


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_curve():
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  four = parallel.data_mesh()
  assert four.devices.size == 4
  p1, l1, _ = _run_steps(one)
  p4, l4, _ = _run_steps(four)
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  assert l1[-1] < l1[0]
  # Adam divides by sqrt(v): float-rounding differences in tiny gradients show up at ~1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), p1, p4)


@pytest.mark.slow
def test_distillation_alpha_zero_is_plain_finetuning_and_self_kl_is_zero():
  mesh = parallel.data_mesh()
  cfg = model_lib.GPT2Config(vocab_size=257, n_layer=2, n_embd=32, n_head=2, n_positions=32,
                             dropout=0.0)
  student = model_lib.init_params(cfg, INIT_SEED)
  plain, l_plain, _ = _run_steps(mesh)
  # The teacher is the student itself: with alpha = 0 the run is plain fine-tuning, and the
  # logged KL(teacher || student) is 0 at the first step (same weights, same logits).
  distilled, l_dist, kls = _run_steps(mesh, teacher=student, alpha=0.0)
  np.testing.assert_allclose(l_plain, l_dist, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, distilled)
  assert abs(kls[0]) < 1e-6 and kls[-1] > 1e-6


def test_distill_kl_matches_numpy():
  rng = np.random.RandomState(0)
  t, s = rng.randn(3, 7), rng.randn(3, 7)
  T = 2.0
  pt = np.exp(t / T) / np.exp(t / T).sum(-1, keepdims=True)
  ps = np.exp(s / T) / np.exp(s / T).sum(-1, keepdims=True)
  want = (pt * (np.log(pt) - np.log(ps))).sum(-1)
  np.testing.assert_allclose(np.asarray(update.distill_kl(t, s, T)), want, rtol=1e-5)


# --- kill / resume through the command line --------------------------------------------

STEPS = 36


def _cmd(workdir, *extra):
  """A run with dropout, gradual pruning (masks in the checkpoint, GMP updates every 3 steps),
  periodic validation and a checkpoint every 10 steps: all of it a resumed run must replay."""
  return cli.command(workdir, f"--config.train.steps={STEPS}", "--config.export.hf=true",
                     "--config.model.dropout=0.1", "--config.prune.method=magnitude",
                     "--config.prune.targets=all", "--config.prune.schedule=gradual",
                     "--config.prune.target=0.5", "--config.prune.start=0.1",
                     "--config.prune.end=0.8", "--config.prune.every=3",
                     "--config.train.eval_every=10", "--config.train.eval_max_tokens=600",
                     "--config.checkpoint.every_steps=10", *extra)


def _interrupt(workdir, sig, after_step, after_checkpoint=None):
  """Starts (or resumes) a run, sends `sig` once it logged `after_step` (and committed the
  checkpoint of step `after_checkpoint`, saved asynchronously); returns its exit code."""
  committed = os.path.join(workdir, "checkpoints", str(after_checkpoint))
  err = f"{workdir}.{sig.name}.err"
  proc = cli.start(_cmd(workdir), err)
  cli.wait_for(proc, lambda: (cli.last_step_logged(workdir) >= after_step
                              and (after_checkpoint is None or os.path.isdir(committed))),
               err, timeout=240)
  code = cli.stop(proc, sig)
  assert not os.path.exists(os.path.join(workdir, "results.json")), "interrupted too late"
  return code


@pytest.mark.slow
def test_killed_then_terminated_run_resumes_bitwise_identical(tmp_path, uninterrupted):
  from blockprune_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  straight, _ = uninterrupted(_cmd)
  d = str(tmp_path / "interrupted")

  _interrupt(d, signal.SIGKILL, 13, after_checkpoint=10)  # no warning: step 10 survives
  assert Checkpointer(os.path.join(d, "checkpoints")).latest_step() == 10
  code = _interrupt(d, signal.SIGTERM, 23)  # resumes at 10; SIGTERM saves where it stands
  assert code == 143
  saved = Checkpointer(os.path.join(d, "checkpoints")).latest_step()
  assert 23 <= saved < STEPS and saved != 20
  cli.run(_cmd(d), check=True)

  cli.assert_same_params(cli.exported_params(straight), cli.exported_params(d))
  results = json.load(open(os.path.join(d, "results.json")))
  assert abs(results["sparsity"]["overall"] - 0.5) < 1e-3
  assert results["train"]["best_validation_perplexity"] is not None
  # A finished run started again only reports what it has.
  assert pipeline.run(tiny_config(), d) == results


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  from blockprune_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from blockprune_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  config = tiny_config(train__steps=8, train__learning_rate=1e30, train__grad_clip=0.0,
                       train__warmup_steps=1, checkpoint__every_steps=1)
  with pytest.raises(UserError, match="non-finite loss at step") as e:
    pipeline.run(config, str(tmp_path / "nan"))
  ckpt = Checkpointer(str(tmp_path / "nan" / "checkpoints"))
  step = ckpt.latest_step()
  assert step is not None and step < 8
  assert f"the last good checkpoint (step {step}) is kept" in str(e.value)
  assert not os.path.exists(tmp_path / "nan" / "results.json")


@pytest.mark.slow
def test_a_divergence_before_any_checkpoint_says_nothing_is_saved(tmp_path, capsys):
  from blockprune_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  config = tiny_config(train__steps=8, train__learning_rate=1e30, train__grad_clip=0.0,
                       train__warmup_steps=1, checkpoint__every_steps=100)
  with pytest.raises(UserError, match="non-finite loss at step") as e:
    pipeline.run(config, str(tmp_path / "nan"))
  line = str(e.value)
  assert "\n" not in line and "None" not in line and "last good checkpoint" not in line
  assert "before the first checkpoint: nothing is saved" in line and "train.learning_rate" in line
  assert f"[blockprune] {line}\n" in capsys.readouterr().err  # the console says the same
  assert len(cli.events(tmp_path / "nan", "diverged")) == 1
  assert not cli.checkpoint_steps(tmp_path / "nan" / "checkpoints")


def test_warmup_starts_above_zero_and_reaches_peak():
  t_cfg = ml_collections.ConfigDict(dict(warmup_steps=4, learning_rate=1e-3, schedule="cosine"))
  lr = train.learning_rate_schedule(t_cfg, 20)
  assert float(lr(0)) == pytest.approx(2.5e-4)
  assert float(lr(3)) == pytest.approx(1e-3)
  assert float(lr(19)) < 1e-4


@pytest.mark.slow
def test_resuming_under_other_settings_is_refused(tmp_path):
  from blockprune_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "run")
  pipeline.run(tiny_config(train__steps=4, checkpoint__every_steps=2), workdir)
  os.remove(os.path.join(workdir, "results.json"))  # as if killed after its last checkpoint
  with pytest.raises(UserError, match="train.learning_rate"):
    pipeline.run(tiny_config(train__steps=4, train__learning_rate=1e-4), workdir)
  # Settings that do not change the trajectory may differ.
  again = pipeline.run(tiny_config(train__steps=4, train__log_every=2, eval__batch_size=4),
                       workdir)
  assert again["train"]["steps"] == 4


def test_a_checkpoint_from_before_the_second_stage_keys_still_resumes():
  from blockprune_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  current = train.resume_keys(tiny_config(prune__method="magnitude", train__steps=4))
  old = {k: v for k, v in current.items()
         if k not in ("prune.pattern", "prune.sequential", "prune.sparsegpt_damp",
                      "prune.sensitivity_ratios", "prune.search_evals", "prune.score_split")}
  train.check_resumable(old, current, "w")  # what it ran is what these keys' defaults do
  with pytest.raises(UserError, match="prune.pattern"):
    train.check_resumable(old, dict(current, **{"prune.pattern": "2:4"}), "w")
  with pytest.raises(UserError, match="prune.score_split"):  # it ran scored on train
    train.check_resumable(old, dict(current, **{"prune.score_split": "validation"}), "w")
