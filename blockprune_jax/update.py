"""Inside a train step: the loss (next-token cross-entropy, plus distillation's KL to a teacher),
its gradient over micro-batches, and the masked optimizer update."""
import jax
import jax.numpy as jnp
import optax

from blockprune_jax import evaluate as eval_lib
from blockprune_jax import model as model_lib
from blockprune_jax.prune import pruning


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
      # One chunk: the plain program holds no more and is faster (bench train).
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


def distill_kl(teacher_logits, student_logits, temperature):
  """Per-token KL(teacher || student) of temperature-softened distributions, [..., V] -> [...]."""
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def step_key(state):
  """The dropout key of the state's step: a resumed run replays the same dropout."""
  return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])


def accumulate_grads(loss_fn, params, batch, key, fold=jax.random.fold_in, constrain=None):
  """(mean gradient, mean [loss, ce, kl]) over the micro-batches batch[0], batch[1], ...
  Micro-batch i gets fold(key, i); constrain lays out each gradient before it is added."""
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


def apply_update(state, grads, sums, optimizer, accum):
  """The masked optimizer step from mean gradients: (new state, metrics)."""
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
  """optax.tree.norm, or optax.global_norm where the installed optax has no optax.tree.norm."""
  tree_api = getattr(optax, "tree", None)
  return tree_api.norm(tree) if hasattr(tree_api, "norm") else optax.global_norm(tree)
