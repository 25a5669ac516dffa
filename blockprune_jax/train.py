"""Masked fine-tuning with optax, data-parallel over every device, resumable with Orbax.

Sections: optimizer, the per-device update, the loop (one run, or K runs side by side as one
program: checkpoints, gradual pruning, periodic evaluation, preemption). The update is one jitted shard_map'd function with the state
donated; gradients are `pmean`ed over the 'data' axis; pruned weights stay exactly 0.0 because
gradients, updates and parameters are all multiplied by the masks.
"""
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

from blockprune_jax import batched
from blockprune_jax import checkpoint as ckpt_lib
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import hf_io
from blockprune_jax import keys as keys_lib
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax.prune import plan as plan_lib
from blockprune_jax.prune import pruning
from blockprune_jax.errors import UserError


class Diverged(UserError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


# --- optimizer ---------------------------------------------------------------------------

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
  """What the compiled step bakes in; the learning rate is an input, so runs that differ only
  in learning rate, schedule or length share one compiled step."""
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float


def optimizer_settings(t_cfg) -> OptimizerSettings:
  return OptimizerSettings(float(t_cfg.b1), float(t_cfg.b2), float(t_cfg.weight_decay),
                           float(t_cfg.grad_clip))


def build_optimizer(settings: OptimizerSettings, learning_rate):
  """AdamW (decoupled decay on matrices only), after global-norm clipping if grad_clip > 0."""
  parts = [optax.clip_by_global_norm(settings.grad_clip)] if settings.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate, b1=settings.b1, b2=settings.b2,
                           weight_decay=settings.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def make_optimizer(t_cfg, total_steps: int):
  """(optimizer with the run's schedule, schedule): for initialising the optimizer state."""
  schedule = learning_rate_schedule(t_cfg, total_steps)
  return build_optimizer(optimizer_settings(t_cfg), schedule), schedule


def learning_rates(schedule, total_steps: int) -> np.ndarray:
  """[total_steps] float32: the learning rate of every step, as the device computes it."""
  return np.asarray(jax.device_get(jax.vmap(schedule)(jnp.arange(total_steps))), np.float32)


def init_state(params, optimizer, masks, seed: int) -> dict:
  """The training state a step takes and returns (and a checkpoint holds).

  {params, opt_state (optimizer.init(params)), masks ({} = dense), step, data_position (micro-
  batches consumed; kept for the checkpoint format, the loop tracks it on the host), rng (raw
  uint32 key data: Orbax stores plain arrays)}.
  """
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
    """After each step: the first one is waited for, so that the rate starts after it."""
    if self.t_first is None:
      jax.block_until_ready(metrics)
      self.t_first, self.step_first = time.time(), step

  def since_last(self, step: int) -> tuple[float, float]:
    """(tokens/s, seconds per step) since the previous call (a log line)."""
    now = time.time()
    steps, seconds = step - self.step_last, now - self.t_last
    self.t_last, self.step_last = now, step
    return steps * self.tokens_per_step / max(seconds, 1e-9), seconds / max(steps, 1)

  def overall(self, step: int):
    """tokens/s after the first step (None when no step followed it)."""
    if self.t_first is None or step <= self.step_first:
      return None
    return (step - self.step_first) * self.tokens_per_step / (time.time() - self.t_first)


def steady_state_guard():
  """The scope of a steady-state step: no implicit device-to-host transfer may happen in it.

  Reading a step's output on the host (`int(state['step'])`) would make the host wait for the
  step, so the next one could not be queued while it runs. Enforced on GPU / TPU by JAX; the
  CPU backend does not check (tests add their own check by replacing this function).
  """
  return jax.transfer_guard_device_to_host("disallow")


# --- the update --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def make_train_step(model_cfg, settings: OptimizerSettings, mesh, *, teacher_cfg=None, alpha=0.0,
                    temperature=1.0, batched=""):
  """jit(shard_map(per-device update)) with the state donated, one per distinct setting.

  step(state, batch, teacher_params, learning_rate) -> (state, {loss, ce, kl, grad_norm}).
  state: {params, opt_state, masks, step, data_position, rng}; batch: [accum, B, T + 1] int32
  sharded over B; teacher_params: teacher params or {}; learning_rate: float32 scalar. Kept
  per (model, optimizer settings, mesh, distillation): a later run of a sweep with the same
  shapes reuses the compiled step instead of tracing and compiling it again.

  batched="vmap" or "map": K runs side by side as one program (sweep.batch_runs). Every leaf of
  the state, the batch ([K, accum, B, T + 1]) and the learning rate ([K]) gain a leading run
  axis, and the metrics are [K]; the update of each run is the one above, mapped over the runs
  by parallel.over_runs, and the teacher is shared.

  On a mesh with an 'fsdp' axis (parallel.train_mesh, mesh.fsdp > 1) the state is sharded
  instead (parallel.place_state) and the step is make_fsdp_train_step's, which computes the
  same update.
  """
  if parallel.FSDP in mesh.axis_names:
    if batched:
      raise UserError("sweep.batch_runs > 1 trains replicated runs: set mesh.fsdp=1")
    return make_fsdp_train_step(model_cfg, settings, mesh, teacher_cfg=teacher_cfg, alpha=alpha,
                                temperature=temperature)
  loss_fn = make_loss_fn(model_cfg, teacher_cfg, alpha, temperature)

  def train_step(state, batch, teacher_params, learning_rate):
    # Different dropout on every device and micro-batch, derived from the step: a resumed run
    # replays the same dropout.
    key = jax.random.fold_in(step_key(state), jax.lax.axis_index(parallel.AXIS))
    grads, sums = accumulate_grads(
        lambda p, seq, k: loss_fn(p, teacher_params, seq, k), state["params"], batch, key)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    return apply_update(state, grads, jax.lax.pmean(sums, parallel.AXIS), settings,
                        learning_rate, batch.shape[0])

  rep = P()
  batch_spec = P(None, parallel.AXIS)
  if batched:
    train_step = parallel.over_runs(train_step, (0, 0, None, 0), batched)
    batch_spec = P(None, None, parallel.AXIS)
  step = parallel.shard_map(train_step, mesh, (rep, batch_spec, rep, rep), (rep, rep))
  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def make_fsdp_train_step(model_cfg, settings: OptimizerSettings, mesh, *, teacher_cfg=None,
                         alpha=0.0, temperature=1.0):
  """make_train_step's update for a state sharded by parallel.state_shardings (FSDP / ZeRO-3).

  One jit over global arrays: XLA gathers each weight where a layer uses it and reduce-scatters
  its gradient, and the optimizer updates only the shard a device holds. The batch is cut into
  one group per device, each with the dropout key the replicated step gives that device, and
  the groups' losses are averaged as the replicated step's pmean does: both layouts compute the
  same update (tests/test_fsdp.py), only the order of the sums differs.
  """
  n, axes = mesh.devices.size, parallel.batch_axes(mesh)
  groups = NamedSharding(mesh, P(None, axes))
  replicated = NamedSharding(mesh, P())
  # Each weight is gathered where the model uses it (per block when it scans), in the dtype its
  # matmul reads (bf16 kernels: half the bytes); left to itself, XLA's sharding propagation
  # would split the activations along the weights' sharded dimension instead of the batch.
  loss_fn = make_loss_fn(model_cfg, teacher_cfg, alpha, temperature,
                         gather=lambda tree: jax.lax.with_sharding_constraint(tree, replicated))

  def train_step(state, batch, teacher_params, learning_rate):
    accum, b = batch.shape[:2]
    batch = jax.lax.with_sharding_constraint(batch.reshape(accum, n, b // n, -1), groups)
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key(state), i))(jnp.arange(n))
    param_shardings = parallel.state_shardings(mesh, state["params"])

    def loss_of_groups(params, seqs, group_keys):
      copy = model_lib.compute_copy(params, model_cfg.dtype)
      losses, (ce, kl) = jax.vmap(lambda s, k: loss_fn(copy, teacher_params, s, k),
                                  spmd_axis_name=axes)(seqs, group_keys)
      return jnp.mean(losses), (jnp.mean(ce), jnp.mean(kl))

    def fold(group_keys, i):
      return jax.vmap(lambda k: jax.random.fold_in(k, i))(group_keys)
    # Reduce-scattered to the parameters' own layout: no device keeps a whole gradient.
    grads, sums = accumulate_grads(
        loss_of_groups, state["params"], batch, keys, fold=fold,
        constrain=lambda g: jax.lax.with_sharding_constraint(g, param_shardings))
    new_state, metrics = apply_update(state, grads, sums, settings, learning_rate, accum)
    new_state = jax.lax.with_sharding_constraint(
        new_state, parallel.state_shardings(mesh, new_state))
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)


def make_loss_fn(model_cfg, teacher_cfg=None, alpha=0.0, temperature=1.0, gather=None):
  """(params, teacher_params, seq [B, T + 1], dropout key) -> (loss, (ce, kl)), token means.

  gather: model.forward's (how sharded weights are gathered where they are used)."""
  gather = gather or (lambda tree: tree)
  teacher = model_lib.GPT2(teacher_cfg) if teacher_cfg is not None else None

  def loss_fn(params, teacher_params, seq, key):
    inputs, labels = seq[:, :-1], seq[:, 1:]
    kl = jnp.zeros((), jnp.float32)
    x = model_lib.forward(model_cfg, params, inputs, train=True, key=key, hidden=True,
                          gather=gather)
    wte = gather(params["wte"]["embedding"])
    logits = None
    if labels.shape[1] <= model_lib.LOSS_CHUNK:
      # One chunk: the plain program holds no more and is faster (on a CPU, 1.45x: bench train).
      logits = model_lib.head_logits(x, wte, model_cfg.dtype)
      ce = jnp.mean(eval_lib.token_nll(logits, labels))
    else:  # the LM head's loss without the [B, T, V] logits
      ce = model_lib.lm_head_loss(x, wte, labels, jnp.ones(labels.shape),
                                  model_cfg.dtype) / labels.size
    if teacher is None:
      return ce, (ce, kl)
    # Distillation compares whole distributions: its KL needs the full logits.
    if logits is None:
      logits = model_lib.head_logits(x, wte, model_cfg.dtype)
    t_logits = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, inputs))
    kl = jnp.mean(distill_kl(t_logits, logits, temperature))
    return (1.0 - alpha) * ce + alpha * temperature ** 2 * kl, (ce, kl)
  return loss_fn


def step_key(state):
  """The dropout key of the state's step: a resumed run replays the same dropout."""
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def accumulate_grads(loss_fn, params, batch, key, fold=jax.random.fold_in, constrain=None):
  """(mean gradient, mean [loss, ce, kl]) over the micro-batches batch[0], batch[1], ...

  loss_fn(params, micro_batch, key) -> (loss, (ce, kl)); micro-batch i gets fold(key, i);
  constrain (optional) lays out each micro-batch's gradient before it is added."""
  def micro(carry, xs):
    grads_acc, sums = carry
    seq, i = xs
    (loss, (ce, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, seq,
                                                                         fold(key, i))
    if constrain is not None:
      grads = constrain(grads)
    grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
    return (grads_acc, sums + jnp.stack([loss, ce, kl])), None

  accum = batch.shape[0]
  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, sums), _ = jax.lax.scan(micro, (zeros, jnp.zeros(3)), (batch, jnp.arange(accum)))
  return jax.tree.map(lambda g: g / accum, grads), sums / accum


def apply_update(state, grads, sums, settings, learning_rate, accum):
  """The masked AdamW step from mean gradients: (new state, metrics).

  Pruned weights stay exactly 0.0: gradients, updates and parameters are all masked."""
  # The optimizer's schedule reads the step's input; its state (the step count) has the
  # same structure as with a schedule function, so older checkpoints still restore.
  optimizer = build_optimizer(settings, lambda count: learning_rate)
  params, masks = state["params"], state["masks"]
  grads = pruning.apply_masks(grads, masks)
  updates, opt_state = optimizer.update(grads, state["opt_state"], params)
  updates = pruning.apply_masks(updates, masks)
  params = pruning.apply_masks(optax.apply_updates(params, updates), masks)
  new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1,
                   data_position=state["data_position"] + accum)
  metrics = {"loss": sums[0], "ce": sums[1], "kl": sums[2], "grad_norm": _global_norm(grads)}
  return new_state, metrics


def _global_norm(tree):
  """optax.tree.norm where it exists (optax >= 0.2.5), else the older optax.global_norm."""
  tree_api = getattr(optax, "tree", None)
  return tree_api.norm(tree) if hasattr(tree_api, "norm") else optax.global_norm(tree)


def distill_kl(teacher_logits, student_logits, temperature):
  """Per-token KL(teacher || student) of temperature-softened distributions, [..., V] -> [...]."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


# --- the loop ----------------------------------------------------------------------------

def fit(runs, *, total, mesh) -> list:
  """Fine-tunes K >= 1 runs for `total` steps with their masks held at zero (and gradual
  pruning where planned): one run, or K side by side as one program.

  runs: pipeline.Prepared (anything with .config, .model_cfg, .streams, .params, .masks ({} =
  dense), .plan, .workdir, .log) of one model shape and data; K > 1 only for runs that
  batched.plan_groups puts together. K = 1 is the one-run program (no run axis); K > 1 stacks
  every leaf of the state on a leading run axis (batched.stack) and maps the update over it.
  Each run saves and resumes its own checkpoints (`workdir/checkpoints`, the one-run format);
  when a group's stand at different steps (a kill between two runs' saves), the runs continue
  one at a time from their own.

  Returns per run (params, masks, train summary), or the Diverged error that ended it (the
  others go on).
  """
  config = runs[0].config
  seq_len = config.data.seq_len
  sequences = data_lib.train_sequences(runs[0].streams.get("train"), seq_len)
  check_batch(config.train, sequences, mesh, seq_len)
  ckpts = [ckpt_lib.Checkpointer(os.path.join(r.workdir, "checkpoints"),
                                 keep=r.config.checkpoint.keep,
                                 every_steps=r.config.checkpoint.every_steps) for r in runs]
  try:  # whatever ends training, pending asynchronous saves finish before we leave
    latest = {c.latest_step() for c in ckpts}
    if len(latest) > 1:
      for c in ckpts:
        c.close()
      ckpts = []
      why = (f"checkpoints of the group stand at steps {sorted(latest, key=str)}: training "
             "one at a time from each run's own")
      for r in runs:
        r.log.event("batch", why, alone=why)
      return [fit([r], total=total, mesh=mesh)[0] for r in runs]
    return _Loop(runs, ckpts, sequences, total=total, mesh=mesh).run()
  finally:
    for c in ckpts:
      c.close()  # waits for pending saves


class _Loop:
  """`fit` block by block: the start state (restored where a checkpoint exists), the steps
  (with gradual pruning), log lines, periodic validation, saves, preemption, the summaries."""

  def __init__(self, runs, ckpts, sequences, *, total, mesh):
    config, model_cfg = runs[0].config, runs[0].model_cfg
    self.runs, self.ckpts, self.sequences, self.total, self.mesh = runs, ckpts, sequences, total, mesh
    self.config, self.t_cfg, self.n = config, config.train, len(runs)
    # Runs that prune while training, or distil, train alone (batched.alone_reason).
    assert self.n == 1 or not any(r.plan.gradual or r.config.distill.teacher for r in runs)
    mode = batched.mode(config) if self.n > 1 else ""  # "": the one-run program, no run axis
    teacher_params, teacher_cfg = hf_io.load_teacher(config, model_cfg)
    self.step_fn = make_train_step(dataclasses.replace(model_cfg, remat=self.t_cfg.remat),
                                   optimizer_settings(self.t_cfg), mesh,
                                   teacher_cfg=teacher_cfg, alpha=float(config.distill.alpha),
                                   temperature=float(config.distill.temperature), batched=mode)
    self.teacher = parallel.replicate(teacher_params, mesh) if teacher_params is not None else {}
    self.apply_fn = model_lib.logits_fn(model_cfg)
    self.eval_step = eval_lib.make_eval_step(self.apply_fn, mesh, batched=mode)
    self.tokens_per_step = self.t_cfg.batch_size * self.t_cfg.grad_accum * config.data.seq_len
    self.failed = [None] * self.n  # the Diverged error of a run whose loss became NaN / Inf
    self.metas, self.lrs = [], None

  def start(self):
    """(state on the devices, step): each run's start state, or its checkpoint's, stacked when
    K > 1. Also sets self.lrs ([total, K] learning rates) and self.metas (checkpoint metadata)."""
    states, lrs = [], []
    for r, ckpt in zip(self.runs, self.ckpts):
      optimizer, schedule = make_optimizer(r.config.train, self.total)
      lrs.append(learning_rates(schedule, self.total))
      masks = r.masks
      if r.plan.gradual and not masks:
        masks = r.plan.full_masks(r.params)  # all ones: the checkpoint tree has its final shape
      state = init_state(r.params, optimizer, masks, r.config.seed + 1)
      ckpt.check_free_space(state)  # one warning line when the disk cannot hold the checkpoints
      meta = {"best_perplexity": None, "final_loss": None, "config": resume_keys(r.config),
              "allocation": plan_lib.stored_allocation(r.plan)}
      if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        check_resumable(meta.get("config"), resume_keys(r.config), r.workdir)
        r.log.event("resume", f"resumed from step {int(state['step'])} of {self.total}",
                    step=int(state["step"]))
      states.append(state)
      self.metas.append(meta)
    self.lrs = np.stack(lrs, axis=1)
    step = int(states[0]["step"])  # every run stands at the same step (fit)
    if self.n > 1:  # one structure: a path that a run does not prune is all-True in its masks
      masks = batched.union_masks([s["masks"] for s in states], self.runs[0].params)
      states = [batched.stack([dict(s, masks=m) for s, m in zip(states, masks)])]
    # Sharded where mesh.fsdp > 1 (parallel.state_shardings), else replicated.
    return parallel.place_state(states[0], self.mesh, donatable=True), step

  def run(self) -> list:
    """The loop; per run (params, masks, summary) or its Diverged error."""
    state, step = self.start()
    clock = Clock(step, self.n * self.tokens_per_step)  # the program's: every run's tokens
    window, window_steps = None, 0  # metric sums since the last log line, still on the device
    t_saved = time.time()  # when the last checkpoint was started (or the loop, before any)
    with ckpt_lib.PreemptionFlag() as preemption:
      while step < self.total and not all(self.failed):
        state = self.gradual_pruning(state, step)
        with steady_state_guard():
          batch, lr = self.inputs(step)
          state, metrics = self.step_fn(state, batch, self.teacher, lr)
          window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
          window_steps += 1
        step += 1
        clock.stepped(step, metrics)
        if step % self.t_cfg.log_every == 0 or step == self.total:
          self.log_lines(step, jax.device_get(window), window_steps, clock)
          window, window_steps = None, 0
        metric = self.validate(state, step)
        # A step with a validation metric is always saved, so the best one can be kept. The
        # last step is saved only if redoing the steps since the last save would cost more
        # than checkpoint.final_after_s: a finished run writes results.json moments later, and
        # a short run killed in between loses less by retraining than it pays for the save.
        # Every process must join a save: process 0's clock decides for all.
        last = step == self.total and parallel.agree(
            time.time() - t_saved > self.config.checkpoint.final_after_s)
        if self.save(state, step, force=last or metric is not None, metric=metric):
          t_saved = time.time()
        if preemption.check(step):
          self.save(state, step, force=True)
          for ckpt in self.ckpts:
            ckpt.wait()
          raise preempted(preemption, step, [r.log for r in self.runs],
                          [r.workdir for r in self.runs])
    jax.block_until_ready(state)
    return self.summaries(state, step, clock)

  def gradual_pruning(self, state, step):
    """New masks before the steps of the GMP schedule (a run that prunes gradually trains
    alone, so its state has no run axis)."""
    plan = self.runs[0].plan
    if not plan.gmp_update(step, self.total):
      return state
    params, masks = plan.prune(state["params"], plan.gmp_ratios(step, self.total),
                               old_masks=state["masks"])
    return dict(state, params=params, masks=masks)

  def inputs(self, step):
    """(batch, learning rate) of `step`: [accum, B, T + 1] sharded over B and a scalar, or with
    a leading run axis [K] (each run's data order from its own seed). The data position is a
    function of the step (resuming under another train.grad_accum is refused), so it is known
    here without asking the device."""
    t = self.t_cfg
    batches = [data_lib.step_batch(self.sequences, step, t.grad_accum, t.batch_size,
                                   r.config.seed) for r in self.runs]
    if self.n == 1:
      return parallel.shard_batch(batches[0], self.mesh, axis=1), self.lrs[step, 0]
    return parallel.shard_batch(np.stack(batches), self.mesh, axis=2), self.lrs[step]

  def log_lines(self, step, window, window_steps, clock):
    """Each run's metrics, the means over the steps since the last line (lm1b: a smoother
    curve than one step); a run whose loss is no longer finite stops (Diverged)."""
    means = {k: np.reshape(np.asarray(v, np.float64), self.n) / window_steps
             for k, v in window.items()}
    tok_s, seconds_per_step = clock.since_last(step)
    for i, r in enumerate(self.runs):
      if self.failed[i] is not None:
        continue
      m = {k: float(v[i]) for k, v in means.items()}
      if not math.isfinite(m["loss"]):
        self.failed[i] = diverged(step, self.ckpts[i])
        r.log.event("diverged", str(self.failed[i]))
        continue
      log_train(r.log, m, step=step, total=self.total, lr=float(self.lrs[step - 1, i]),
                tok_s=tok_s, seconds_per_step=seconds_per_step)
      self.metas[i]["final_loss"] = m["loss"]

  def validate(self, state, step):
    """Each run's validation perplexity every train.eval_every steps (the last step has the
    final evaluation), else None."""
    every = self.t_cfg.eval_every
    if not every or step % every or step >= self.total or all(self.failed):
      return None
    results = periodic_validation(self.config, self.apply_fn, state["params"],
                                  self.runs[0].streams, self.mesh, self.eval_step,
                                  runs=self.n if self.n > 1 else None)
    results = results if self.n > 1 else [results]
    for r, res, meta in zip(self.runs, results, self.metas):
      r.log.metric(step, "validation", loss=res["loss"], perplexity=res["perplexity"])
      r.log.event("validation", f"step {step}: validation perplexity {res['perplexity']:.3f}")
      if meta["best_perplexity"] is None or res["perplexity"] < meta["best_perplexity"]:
        meta["best_perplexity"] = res["perplexity"]
    return [res["perplexity"] for res in results]

  def save(self, state, step, *, force, metric=None) -> bool:
    """Each live run's checkpoint of `step`, in the one-run format; whether any was written."""
    saved = False
    for i, (ckpt, meta) in enumerate(zip(self.ckpts, self.metas)):
      if self.failed[i] is None:
        saved |= ckpt.save(step, self.own(state, i), meta, force=force,
                           metric=None if metric is None else metric[i])
    return saved

  def own(self, state, i):
    """Run i's state with its own masks (K = 1: the state itself)."""
    if self.n == 1:
      return state
    one = dict(batched.take(state, i))
    one["masks"] = batched.own_masks(one["masks"], self.runs[i].masks)
    return one

  def summaries(self, state, step, clock) -> list:
    tok_s = clock.overall(step)  # the program's throughput: every run's tokens
    # Gathered first: a sharded state (mesh.fsdp > 1) has no process holding all of it.
    host = jax.device_get(parallel.gather({"params": state["params"], "masks": state["masks"]},
                                          self.mesh))
    out = []
    for i, meta in enumerate(self.metas):
      if self.failed[i] is not None:
        out.append(self.failed[i])
        continue
      params, masks = host["params"], host["masks"]
      if self.n > 1:  # masks were held: the run's own
        params, masks = jax.tree.map(lambda x, i=i: x[i], params), self.runs[i].masks
      out.append((params, masks, {
          "steps": self.total, "tokens": self.total * self.tokens_per_step,
          "final_loss": meta["final_loss"], "best_validation_perplexity": meta["best_perplexity"],
          "tokens_per_s": tok_s, "seconds": (time.time() - clock.t0) / self.n}))
    return out


def periodic_validation(config, apply_fn, params, streams, mesh, eval_step, runs=None):
  """Validation perplexity during training (every train.eval_every steps): the first
  train.eval_max_tokens tokens, windows of data.seq_len. runs=K: K stacked runs, K results."""
  stream = streams.get("validation")
  if config.train.eval_max_tokens:
    stream = stream[:config.train.eval_max_tokens]
  return eval_lib.evaluate(apply_fn, params, stream, seq_len=config.data.seq_len,
                           stride=config.data.seq_len, batch_size=config.eval.batch_size,
                           mesh=mesh, progress=False, step_fn=eval_step, runs=runs)


def check_batch(t_cfg, sequences, mesh, seq_len):
  """One line for a train batch that the devices or the train split cannot hold."""
  n_dev = mesh.devices.size
  if t_cfg.batch_size % n_dev:
    raise UserError(f"train.batch_size={t_cfg.batch_size} must be a multiple of the "
                    f"{n_dev} devices")
  if len(sequences) < t_cfg.batch_size:
    raise UserError(f"the train split has {len(sequences)} sequences of data.seq_len={seq_len}, "
                    f"fewer than train.batch_size={t_cfg.batch_size}")


def log_train(log, m, *, step, total, lr, tok_s, seconds_per_step):
  """The train metrics (means since the last line) to metrics.jsonl and one console line."""
  log.metric(step, "train", loss=m["loss"], ce=m["ce"], kl=m["kl"], grad_norm=m["grad_norm"],
             learning_rate=lr, tokens_per_s=tok_s)
  log.event("train", f"step {step}/{total}  loss {m['loss']:.4f}  lr {lr:.2e}  "
            f"{tok_s:,.0f} tok/s  eta {(total - step) * seconds_per_step:,.0f}s")


def diverged(step, ckpt) -> Diverged:
  return Diverged(f"non-finite loss at step {step}; the last good checkpoint (step "
                  f"{ckpt.latest_step()}) is kept: lower train.learning_rate or raise "
                  "train.warmup_steps, then run the same command again")


def preempted(preemption, step, logs, workdirs) -> Exception:
  """The exception that ends a loop stopped by SIGTERM / Ctrl-C once its checkpoints are saved."""
  for log in logs:
    log.event("preempted", f"{preemption.signal_name}: saved step {step}; run the same "
              "command to resume", signal=preemption.signal_name)
  where = ", ".join(f"{w}/checkpoints" for w in workdirs)
  return preemption.error(f"checkpoint saved at step {step} in {where}; "
                          "run the same command to resume")


# Keys that may change between a run and its resumption: they do not alter the trajectory.
_FREE_TO_CHANGE = keys_lib.where(resume=True)


def resume_keys(config) -> dict:
  """The flattened config entries that a checkpoint's trajectory depends on."""
  flat = {k: list(v) if isinstance(v, tuple) else v
          for k, v in config_lib.flatten(config).items()}
  free = set(_FREE_TO_CHANGE)
  if flat.get("prune.method") == "none":
    free |= keys_lib.where(needs="pruning")
  if not flat.get("distill.teacher"):
    free |= keys_lib.where(needs="distillation")
  return {k: v for k, v in flat.items() if k not in free}


def check_resumable(saved: dict, current: dict, workdir: str):
  """Refuses to continue a checkpoint under a config that would change its trajectory."""
  if not saved:
    return
  # A checkpoint from before some keys existed ran with their legacy values (keys.py).
  saved = {**keys_lib.legacy_values(saved, current), **saved}
  diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if diff:
    shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diff[:4])
    raise UserError(f"{workdir} holds a checkpoint of a run with other settings ({shown}"
                    f"{', ...' if len(diff) > 4 else ''}): use a new --workdir, or the old values")
