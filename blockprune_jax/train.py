"""Masked fine-tuning of one run: optimizer, the jitted step (state donated), the loop (`fit`),
resume rules. Pruned weights stay exactly 0.0: gradients, updates and parameters are masked."""
import dataclasses
import functools
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from blockprune_jax import checkpoint as ckpt_lib
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import flops
from blockprune_jax import hf_io
from blockprune_jax import keys as keys_lib
from blockprune_jax import update
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax import preemption as preemption_lib
from blockprune_jax.prune import plan as plan_lib
from blockprune_jax.errors import UserError


class Diverged(UserError):
  """The loss became NaN or Inf."""


def learning_rate_schedule(t_cfg, total_steps: int):
  """Linear warmup, then cosine / linear decay to 0 (or constant)."""
  warmup = t_cfg.warmup_steps or max(1, int(0.05 * total_steps))
  warmup = min(warmup, total_steps)
  peak = t_cfg.learning_rate
  decay_steps = max(1, total_steps - warmup)
  if t_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  elif t_cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  # Step t of warmup uses peak * (t + 1) / warmup: the first step already learns.
  warm = optax.linear_schedule(peak / warmup, peak, max(1, warmup - 1))
  return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params):
  """Weight decay on matrices only: not on biases, LayerNorm or embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


class OptimizerSettings(NamedTuple):
  """What the compiled step bakes in (the learning rate is an input: one compiled step serves
  every learning rate, schedule and length)."""
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float


def optimizer_settings(t_cfg) -> OptimizerSettings:
  return OptimizerSettings(float(t_cfg.b1), float(t_cfg.b2), float(t_cfg.weight_decay),
                           float(t_cfg.grad_clip))


def build_optimizer(settings: OptimizerSettings, learning_rate):
  """AdamW (decoupled decay on matrices only), after global-norm clipping if grad_clip > 0.
  Inside a step the learning rate is `lambda count: lr`: the state keeps a schedule's structure,
  so every checkpoint restores."""
  parts = [optax.clip_by_global_norm(settings.grad_clip)] if settings.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate, b1=settings.b1, b2=settings.b2,
                           weight_decay=settings.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def make_optimizer(t_cfg, total_steps: int):
  schedule = learning_rate_schedule(t_cfg, total_steps)
  return build_optimizer(optimizer_settings(t_cfg), schedule), schedule


def learning_rates(schedule, total_steps: int) -> np.ndarray:
  """[total_steps] float32: the learning rate of every step, as the device computes it."""
  return np.asarray(jax.device_get(jax.vmap(schedule)(jnp.arange(total_steps))), np.float32)


def init_state(params, optimizer, masks, seed: int) -> dict:
  """The state a step takes and returns (and a checkpoint holds). masks: {} = dense; rng: raw
  uint32 key data (Orbax stores plain arrays)."""
  return {
      "params": params, "opt_state": optimizer.init(params), "masks": masks,
      "step": np.zeros((), np.int32), "data_position": np.zeros((), np.int32),
      "rng": np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), np.uint32),
  }


class Clock:
  """Tokens per second of a training loop; the first (compiling) step is left out."""

  def __init__(self, step: int, tokens_per_step: int):
    self.t0 = self.t_last = time.time()
    self.t_first, self.step_first, self.step_last = None, step, step
    self.tokens_per_step = tokens_per_step

  def stepped(self, step: int, metrics):
    if self.t_first is None:  # the first step is waited for: the rate starts after it
      jax.block_until_ready(metrics)
      self.t_first, self.step_first = time.time(), step

  def since_last(self, step: int) -> tuple[float, float]:
    """(tokens/s, seconds per step) since the previous call."""
    now = time.time()
    steps, seconds = step - self.step_last, now - self.t_last
    self.t_last, self.step_last = now, step
    return steps * self.tokens_per_step / max(seconds, 1e-9), seconds / max(steps, 1)

  def overall(self, step: int):  # None when no step followed the first
    if self.t_first is None or step <= self.step_first:
      return None
    return (step - self.step_first) * self.tokens_per_step / (time.time() - self.t_first)


def steady_state_guard():
  """No implicit device-to-host transfer in a steady-state step: it would wait for the step instead
  of queueing the next. Enforced on GPU / TPU, not on CPU (tests replace this function)."""
  return jax.transfer_guard_device_to_host("disallow")


@functools.lru_cache(maxsize=None)
def make_train_step(model_cfg, settings: OptimizerSettings, mesh, *, teacher_cfg=None, alpha=0.0,
                    temperature=1.0):
  """step(state, batch [accum, B, T + 1] sharded over B, teacher_params or {}, learning rate) ->
  (state, {loss, ce, kl, grad_norm}), state donated; cached (a sweep's later runs reuse it)."""
  if parallel.FSDP in mesh.axis_names:
    return make_fsdp_train_step(model_cfg, settings, mesh, teacher_cfg=teacher_cfg, alpha=alpha,
                                temperature=temperature)
  step = device_train_step(model_cfg, settings, teacher_cfg, alpha, temperature)
  rep = P()
  step = parallel.shard_map(step, mesh, (rep, P(None, parallel.AXIS), rep, rep), (rep, rep))
  return jax.jit(step, donate_argnums=0)


def device_train_step(model_cfg, settings, teacher_cfg=None, alpha=0.0, temperature=1.0):
  """The update on one device of the 'data' axis (gradients and metrics pmean'ed over it)."""
  loss_fn = update.make_loss_fn(model_cfg, teacher_cfg, alpha, temperature)

  def train_step(state, batch, teacher_params, learning_rate):
    key = jax.random.fold_in(update.step_key(state), jax.lax.axis_index(parallel.AXIS))
    grads, sums = update.accumulate_grads(
        lambda p, seq, k: loss_fn(p, teacher_params, seq, k), state["params"], batch, key)
    grads, sums = jax.lax.pmean(grads, parallel.AXIS), jax.lax.pmean(sums, parallel.AXIS)
    optimizer = build_optimizer(settings, lambda count: learning_rate)
    return update.apply_update(state, grads, sums, optimizer, batch.shape[0])
  return train_step


def make_fsdp_train_step(model_cfg, settings: OptimizerSettings, mesh, *, teacher_cfg=None,
                         alpha=0.0, temperature=1.0):
  """make_train_step's update of a state sharded by parallel.state_shardings (FSDP / ZeRO-3), one
  jit over global arrays. The batch is cut into one group per device, each with the dropout key
  the replicated step gives that device: the same update (tests/test_fsdp.py), summed in another
  order."""
  n, axes = mesh.devices.size, parallel.batch_axes(mesh)
  groups = NamedSharding(mesh, P(None, axes))
  replicated = NamedSharding(mesh, P())
  # Each weight is gathered where it is used, in its matmul's dtype; left to itself, XLA would
  # split the activations along the weights' sharded dimension instead of the batch.
  loss_fn = update.make_loss_fn(model_cfg, teacher_cfg, alpha, temperature,
                                gather=lambda t: jax.lax.with_sharding_constraint(t, replicated))

  def train_step(state, batch, teacher_params, learning_rate):
    accum, b = batch.shape[:2]
    batch = jax.lax.with_sharding_constraint(batch.reshape(accum, n, b // n, -1), groups)
    keys = jax.vmap(lambda i: jax.random.fold_in(update.step_key(state), i))(jnp.arange(n))
    param_shardings = parallel.state_shardings(mesh, state["params"])

    def loss_of_groups(params, seqs, group_keys):
      copy = model_lib.compute_copy(params, model_cfg.dtype)
      losses, (ce, kl) = jax.vmap(lambda s, k: loss_fn(copy, teacher_params, s, k),
                                  spmd_axis_name=axes)(seqs, group_keys)
      return jnp.mean(losses), (jnp.mean(ce), jnp.mean(kl))

    def fold(group_keys, i):
      return jax.vmap(lambda k: jax.random.fold_in(k, i))(group_keys)
    # Reduce-scattered to the parameters' own layout: no device keeps a whole gradient.
    grads, sums = update.accumulate_grads(
        loss_of_groups, state["params"], batch, keys, fold=fold,
        constrain=lambda g: jax.lax.with_sharding_constraint(g, param_shardings))
    optimizer = build_optimizer(settings, lambda count: learning_rate)
    new_state, metrics = update.apply_update(state, grads, sums, optimizer, accum)
    new_state = jax.lax.with_sharding_constraint(
        new_state, parallel.state_shardings(mesh, new_state))
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def fit(config, model_cfg, params, masks, plan, streams, workdir, log, *, total, mesh):
  """Fine-tunes one run for `total` steps, resuming from workdir/checkpoints. params / masks ({} =
  dense): host pytrees. Returns (params, masks, train summary) on the host; raises Diverged."""
  sequences = train_sequences(config, streams, mesh)
  with checkpointer(config, workdir) as ckpt:  # closing waits for pending saves
    run = Run(config, model_cfg, streams, sequences, workdir, log, ckpt, total, mesh, plan)
    state = run.start(params, masks)
    teacher_params, teacher_cfg = hf_io.load_teacher(config, model_cfg)
    step_fn = make_train_step(dataclasses.replace(model_cfg, remat=config.train.remat),
                              optimizer_settings(config.train), mesh, teacher_cfg=teacher_cfg,
                              alpha=float(config.distill.alpha),
                              temperature=float(config.distill.temperature))
    teacher = parallel.replicate(teacher_params, mesh) if teacher_params is not None else {}
    state, clock = loop(run, parallel.place_state(state, mesh, donatable=True), step_fn, teacher)
    if run.failed:
      raise run.failed
    # Gathered first: a sharded state has no process holding all of it.
    host = jax.device_get(parallel.gather(dict(params=state["params"], masks=state["masks"]), mesh))
    return host["params"], host["masks"], run.summary(clock)


def loop(run, state, step_fn, teacher):
  """Step, log, validation perplexity, checkpoint, until run.total steps; (state, Clock).
  run: a Run, or any object with the same hooks (several runs driven as one)."""
  step = run.step
  clock = Clock(step, run.tokens_per_step)
  window, window_steps = None, 0  # metric sums since the last log line, still on the device
  t_saved = time.time()  # when the last checkpoint was started (or the loop, before any)
  with preemption_lib.PreemptionFlag() as preemption:
    while step < run.total and not run.stopped():
      state = run.before_step(state, step)
      with steady_state_guard():
        batch, lr = run.inputs(step)
        state, metrics = step_fn(state, batch, teacher, lr)
        window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
        window_steps += 1
      step += 1
      clock.stepped(step, metrics)
      if step % run.config.train.log_every == 0 or step == run.total:
        means = {k: np.asarray(v, np.float64) / window_steps
                 for k, v in jax.device_get(window).items()}
        run.logged(step, means, *clock.since_last(step))
        window, window_steps = None, 0
      metric = run.periodic_eval(state, step)
      # A step with a validation metric is saved (the best is kept); the last one only when
      # redoing it would cost more than checkpoint.final_after_s. Process 0's clock decides.
      last = step == run.total and parallel.agree(
          time.time() - t_saved > run.config.checkpoint.final_after_s)
      if run.save(state, step, force=last or metric is not None, metric=metric):
        t_saved = time.time()
      if preemption.check(step):
        run.save(state, step, force=True)
        raise run.preempted(preemption, step)
  jax.block_until_ready(state)
  return state, clock


class Run:
  """One run in `loop`: its data, learning rates, log lines, validation, checkpoints."""

  def __init__(self, config, model_cfg, streams, sequences, workdir, log, ckpt, total, mesh,
               plan):
    self.config, self.streams, self.sequences, self.workdir = config, streams, sequences, workdir
    self.log, self.ckpt, self.total, self.mesh, self.plan = log, ckpt, total, mesh, plan
    t = config.train
    self.tokens_per_step = t.batch_size * t.grad_accum * config.data.seq_len
    self.model_cfg = model_cfg
    self.apply_fn = model_lib.logits_fn(model_cfg)
    self.eval_step = eval_lib.make_eval_step(self.apply_fn, mesh)
    self.failed = None  # the Diverged error once the loss is no longer finite
    self.step, self.meta, self.lrs = 0, None, None

  def start(self, params, masks) -> dict:
    """The start state on the host, or its newest checkpoint's."""
    optimizer, schedule = make_optimizer(self.config.train, self.total)
    self.lrs = learning_rates(schedule, self.total)
    if self.plan.gradual and not masks:
      masks = self.plan.full_masks(params)  # all ones: the checkpoint tree has its final shape
    state = init_state(params, optimizer, masks, self.config.seed + 1)
    self.ckpt.check_free_space(state)
    self.meta = {"best_perplexity": None, "final_loss": None, "config": resume_keys(self.config),
                 "allocation": plan_lib.stored_allocation(self.plan)}
    if self.ckpt.latest_step() is not None:
      state, self.meta = self.ckpt.restore(state)
      check_resumable(self.meta.get("config"), resume_keys(self.config), self.workdir)
      self.log.event("resume", f"resumed from step {int(state['step'])} of {self.total}",
                     step=int(state["step"]))
    self.step = int(state["step"])
    return state

  def stopped(self) -> bool:
    return self.failed is not None

  def before_step(self, state, step):  # gradual pruning: new masks on the GMP schedule
    if not self.plan.gmp_update(step, self.total):
      return state
    params, masks = self.plan.prune(state["params"], self.plan.gmp_ratios(step, self.total),
                                    old_masks=state["masks"])
    return dict(state, params=params, masks=masks)

  def batch(self, step) -> np.ndarray:  # [accum, B, T + 1]: a function of the step and seed
    t = self.config.train
    return data_lib.step_batch(self.sequences, step, t.grad_accum, t.batch_size,
                               self.config.seed)

  def inputs(self, step):
    return parallel.shard_batch(self.batch(step), self.mesh, axis=1), self.lrs[step]

  def logged(self, step, means, tok_s, seconds_per_step):
    m = {k: float(v) for k, v in means.items()}  # since the last line; a non-finite loss stops
    if not math.isfinite(m["loss"]):
      self.failed = diverged(step, self.ckpt.latest_step())
      self.log.event("diverged", str(self.failed))
      return
    lr = float(self.lrs[step - 1])
    # Utilisation of the devices' peak where it is known (not on a CPU: the line stays as is).
    mfu = flops.mfu(self.model_cfg, self.config.data.seq_len, tok_s, self.mesh.devices.flat)
    extra, util = ({}, "") if mfu is None else ({"mfu": mfu}, f"  mfu {mfu:.1%}")
    self.log.metric(step, "train", loss=m["loss"], ce=m["ce"], kl=m["kl"],
                    grad_norm=m["grad_norm"], learning_rate=lr, tokens_per_s=tok_s, **extra)
    self.log.event("train", f"step {step}/{self.total}  loss {m['loss']:.4f}  lr {lr:.2e}  "
                   f"{tok_s:,.0f} tok/s{util}  eta {(self.total - step) * seconds_per_step:,.0f}s")
    self.meta["final_loss"] = m["loss"]

  def eval_due(self, step) -> bool:
    """Every train.eval_every steps; the last step has the final evaluation instead."""
    every = self.config.train.eval_every
    return bool(every) and step % every == 0 and step < self.total

  def periodic_eval(self, state, step):
    if self.stopped() or not self.eval_due(step):
      return None
    result = self.validation(state["params"], self.eval_step)
    self.evaluated(step, result)
    return result["perplexity"]

  def validation(self, params, eval_step):
    """Validation perplexity during training: the first train.eval_max_tokens tokens."""
    c = self.config
    stream = self.streams.get("validation")[:c.train.eval_max_tokens or None]
    return eval_lib.evaluate(self.apply_fn, params, stream, seq_len=c.data.seq_len,
                             stride=c.data.seq_len, batch_size=c.eval.batch_size, mesh=self.mesh,
                             progress=False, step_fn=eval_step)

  def evaluated(self, step, result):
    ppl = result["perplexity"]
    self.log.metric(step, "validation", loss=result["loss"], perplexity=ppl)
    self.log.event("validation", f"step {step}: validation perplexity {ppl:.3f}")
    if self.meta["best_perplexity"] is None or ppl < self.meta["best_perplexity"]:
      self.meta["best_perplexity"] = ppl

  def save(self, state, step, *, force, metric=None) -> bool:
    if self.stopped():
      return False
    return self.ckpt.save(step, state, self.meta, force=force, metric=metric)

  def preempted(self, preemption, step) -> Exception:  # SIGTERM / Ctrl-C, the step saved
    self.ckpt.wait()
    self.log.event("preempted", f"{preemption.signal_name}: saved step {step}; run the same "
                   "command to resume", signal=preemption.signal_name)
    return preempted_error(preemption, step, [self.workdir])

  def summary(self, clock, share=1) -> dict:
    """results.json's train section; share: the runs whose tokens and time the clock counts."""
    return {"steps": self.total, "tokens": self.total * self.tokens_per_step,
            "final_loss": self.meta["final_loss"],
            "best_validation_perplexity": self.meta["best_perplexity"],
            "tokens_per_s": clock.overall(self.total), "seconds": (time.time() - clock.t0) / share}


def checkpointer(config, workdir):
  return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                               every_steps=config.checkpoint.every_steps)


def train_sequences(config, streams, mesh):
  """The train split as sequences; one line for a batch the devices or the split cannot hold."""
  t, seq_len = config.train, config.data.seq_len
  sequences = data_lib.train_sequences(streams.get("train"), seq_len)
  if t.batch_size % mesh.devices.size:
    raise UserError(f"train.batch_size={t.batch_size} must be a multiple of the "
                    f"{mesh.devices.size} devices")
  if len(sequences) < t.batch_size:
    raise UserError(f"the train split has {len(sequences)} sequences of data.seq_len={seq_len}, "
                    f"fewer than train.batch_size={t.batch_size}")
  return sequences


def diverged(step, saved_step) -> Diverged:
  fix = "lower train.learning_rate or raise train.warmup_steps"
  if saved_step is None:
    return Diverged(f"non-finite loss at step {step}, before the first checkpoint: nothing is "
                    f"saved; {fix}, then run again (it starts from step 0)")
  return Diverged(f"non-finite loss at step {step}; the last good checkpoint (step "
                  f"{saved_step}) is kept: {fix}, then run the same command again")


def preempted_error(preemption, step, workdirs) -> Exception:
  where = ", ".join(f"{w}/checkpoints" for w in workdirs)
  return preemption.error(f"checkpoint saved at step {step} in {where}; "
                          "run the same command to resume")


def resume_keys(config) -> dict:
  """The flattened config entries that a checkpoint's trajectory depends on."""
  flat = {k: list(v) if isinstance(v, tuple) else v
          for k, v in config_lib.flatten(config).items()}
  free = set(keys_lib.where(resume=True))  # keys that do not alter the trajectory
  if flat.get("prune.method") == "none":
    free |= keys_lib.where(needs="pruning")
  if not flat.get("distill.teacher"):
    free |= keys_lib.where(needs="distillation")
  return {k: v for k, v in flat.items() if k not in free}


def changed_keys(a: dict, b: dict) -> list:
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_resumable(saved: dict, current: dict, workdir: str):
  """Refuses to continue a checkpoint under a config that would change its trajectory."""
  if not saved:
    return
  # A checkpoint from before some keys existed ran with their legacy values (keys.py).
  saved = {**keys_lib.legacy_values(saved, current), **saved}
  diff = changed_keys(saved, current)
  if diff:
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:4])
    raise UserError(f"{workdir} holds a checkpoint of a run with other settings ({shown}"
                    f"{', ...' if len(diff) > 4 else ''}): use a new --workdir, or the old values")
