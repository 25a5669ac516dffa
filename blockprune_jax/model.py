"""GPT-2 in Flax linen, named like Hugging Face's so checkpoints map by name.

Parameters: {'wte', 'wpe', 'h_0' ... 'h_{n-1}', 'ln_f'}; each block
{'ln_1', 'attn': {'c_attn', 'c_proj'}, 'ln_2', 'mlp': {'c_fc', 'c_proj'}}.
Dense kernels are [in, out], the layout of HF's Conv1D weights, so import is a rename.
Parameters are float32; `dtype` is the compute dtype of the matrix multiplies.
"""
import dataclasses
import functools
import importlib.util
import math
from typing import Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PRESETS = {
    # name: (n_layer, n_embd, n_head)
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
    # small shapes for tests and CPU demos
    "tiny": (2, 64, 2),
    "mini": (4, 128, 4),
    "small": (6, 256, 4),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  dropout: float = 0.1  # embedding and residual dropout (training only)
  layer_norm_epsilon: float = 1e-5
  dtype: str = "float32"  # compute dtype; parameters stay float32
  attention: str = "auto"  # auto | cudnn | xla
  # Per-layer MLP hidden widths after structured pruning is compacted; None = 4 * n_embd.
  mlp_widths: Optional[Tuple[int, ...]] = None
  # none | block: recompute each block's activations in the backward pass (train.remat) instead
  # of keeping them, for models whose activations would not fit otherwise.
  remat: str = "none"
  # Train with the blocks as one lax.scan over their stacked parameters (model.scan_layers):
  # under mesh.fsdp each block's weights are then gathered only while that block runs, not all
  # at once. Parameters keep their h_i names. Evaluation, whose parameters are replicated (a
  # stacked copy would double them), runs unrolled.
  scan_layers: bool = False

  def mlp_width(self, layer: int) -> int:
    return self.mlp_widths[layer] if self.mlp_widths else 4 * self.n_embd

  @property
  def scanned(self) -> bool:
    """Whether forward() scans: asked for, and every block has the same shape (a compacted
    model with per-layer MLP widths runs unrolled)."""
    return self.scan_layers and len({self.mlp_width(i) for i in range(self.n_layer)}) == 1


def preset(name: str, **overrides) -> GPT2Config:
  n_layer, n_embd, n_head = PRESETS[name]
  return GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **overrides)


# GPT-2's initialisation: N(0, 0.02) for every matrix, zero biases; the two projections that
# write into the residual stream (attn.c_proj, mlp.c_proj) get 0.02 / sqrt(2 * n_layer), so the
# stream's variance does not grow with depth (GPT-2 paper, section 2.3; HF and nanoGPT do the same).
_dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.02))


def _residual_dense(cfg, features, dtype):
  std = 0.02 / math.sqrt(2 * cfg.n_layer)
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(std), name="c_proj")


def _sow_inputs(module: nn.Module, name: str, x):
  """Records a matrix's inputs x [..., in] for calibration, summed over tokens.

  'stats': sum of x**2 per input feature [in] (Wanda / OWL); 'hessian': sum of x x^T [in, in]
  (SparseGPT). No-ops unless apply() is called with that collection mutable, so training and
  evaluation pay nothing.
  """
  if module.is_mutable_collection("stats"):
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))
    module.sow("stats", name, sq)
  if module.is_mutable_collection("hessian"):
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    module.sow("hessian", name, jnp.dot(flat.T, flat, precision=jax.lax.Precision.HIGHEST))


def _dot_attention(q, k, v, impl):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def _cudnn_or_xla(q, k, v):
  try:  # raises while tracing where cuDNN is missing or cannot take these shapes
    return _dot_attention(q, k, v, "cudnn")
  except Exception as e:  # pylint: disable=broad-except
    if cuda_plugin_installed():
      _warn_xla_fallback(type(e).__name__)
    return _dot_attention(q, k, v, "xla")


def attention(q, k, v, cfg: GPT2Config):
  """Causal attention. q, k, v: [batch, time, heads, head_dim].

  auto: cuDNN's fused kernel (~2x XLA's on H100, README "Speed"; half precision only) where the
  step is lowered for CUDA devices, else XLA's. Chosen by lax.platform_dependent at lowering,
  from the devices the step is compiled for, so a fit check from a CPU host (bench aot) and a
  run on the GPU compile the same program."""
  if cfg.attention != "auto":
    return _dot_attention(q, k, v, cfg.attention)
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return _dot_attention(q, k, v, "xla")
  return jax.lax.platform_dependent(q, k, v, cuda=_cudnn_or_xla,
                                    default=functools.partial(_dot_attention, impl="xla"))


@functools.lru_cache(maxsize=None)
def cuda_plugin_installed() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ImportError:  # no jax_plugins namespace at all
    return False


@functools.lru_cache(maxsize=None)  # once per reason, not at every trace
def _warn_xla_fallback(reason: str):
  logging.warning("model.attention=auto: cuDNN attention is unavailable here (%s); using XLA's "
                  "(slower; set model.attention=xla to choose it)", reason)


class Attention(nn.Module):
  cfg: GPT2Config

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, d = x.shape
    hd = d // cfg.n_head
    _sow_inputs(self, "c_attn_in", x)
    qkv = _dense(3 * d, dtype=dt, name="c_attn")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * cfg.n_head, hd), 3, axis=2)
    y = attention(q, k, v, cfg).reshape(b, t, d)
    _sow_inputs(self, "c_proj_in", y)
    return _residual_dense(cfg, d, dt)(y)


class MLP(nn.Module):
  cfg: GPT2Config
  width: int

  @nn.compact
  def __call__(self, x):
    dt = jnp.dtype(self.cfg.dtype)
    _sow_inputs(self, "c_fc_in", x)
    h = nn.gelu(_dense(self.width, dtype=dt, name="c_fc")(x), approximate=True)
    _sow_inputs(self, "c_proj_in", h)
    return _residual_dense(self.cfg, x.shape[-1], dt)(h)


def _layer_norm(cfg: GPT2Config, name=None):
  # In float32 with a float32 residual stream, as under PyTorch autocast.
  return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=jnp.float32, name=name)


def _check_length(cfg: GPT2Config, t: int):
  if t > cfg.n_positions:
    raise ValueError(f"sequence of {t} tokens exceeds n_positions={cfg.n_positions}")


class Block(nn.Module):
  cfg: GPT2Config
  layer: int

  @nn.compact
  def __call__(self, x, train: bool):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout, deterministic=not train)
    x = x + drop(Attention(cfg, name="attn")(_layer_norm(cfg, "ln_1")(x))).astype(jnp.float32)
    h = MLP(cfg, cfg.mlp_width(self.layer), name="mlp")(_layer_norm(cfg, "ln_2")(x))
    return x + drop(h).astype(jnp.float32)


class GPT2(nn.Module):
  """input_ids [batch, time] int -> logits [batch, time, vocab] in the compute dtype, or with
  hidden=True the final LayerNorm's output [batch, time, n_embd] float32 (for lm_head_nll)."""
  cfg: GPT2Config

  @nn.compact
  def __call__(self, input_ids, train: bool = False, hidden: bool = False):
    cfg = self.cfg
    t = input_ids.shape[1]
    _check_length(cfg, t)
    init = nn.initializers.normal(0.02)
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, name="wpe")
    x = wte(input_ids) + wpe(jnp.arange(t)[None])
    x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
    # remat=block keeps only each block's input for the backward pass (train is static).
    block = nn.remat(Block, static_argnums=(2,)) if cfg.remat == "block" else Block
    for i in range(cfg.n_layer):
      x = block(cfg, i, name=f"h_{i}")(x, train)
    x = _layer_norm(cfg, "ln_f")(x)
    if hidden:
      return x
    return head_logits(x, wte.embedding, cfg.dtype)


def compute_copy(params, dtype):
  """params with every Dense kernel cast to the compute dtype, as the Dense layers cast them
  anyway (the same numbers; a gathered or stacked bf16 kernel takes half the memory)."""
  dt = jnp.dtype(dtype)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.astype(dt) if getattr(path[-1], "key", None) == "kernel" else x, params)


def forward(cfg: GPT2Config, params, input_ids, *, train: bool = False, key=None,
            hidden: bool = False, gather=None):
  """GPT2(cfg).apply({"params": params}, input_ids, train, hidden) with dropout key `key`; with
  cfg.scanned the blocks run as one lax.scan (the same function; dropout draws differ).

  gather (optional): applied to the parameters where they are used, e.g. a sharding constraint
  that all-gathers FSDP-sharded weights. Unrolled, it is applied to the whole tree up front;
  scanned, to the embeddings and final LayerNorm up front and to each block's weights inside the
  scan, so only one block's weights are gathered at a time.
  """
  gather = gather or (lambda tree: tree)
  rngs = {"dropout": key} if train else {}
  if not cfg.scanned:
    return GPT2(cfg).apply({"params": gather(params)}, input_ids, train=train, hidden=hidden,
                           rngs=rngs)
  _check_length(cfg, input_ids.shape[1])
  outer = gather({name: params[name] for name in ("wte", "wpe", "ln_f")})
  # The stack is a copy: of the kernels in the compute dtype, and under FSDP of one shard.
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      compute_copy(params[f"h_{i}"], cfg.dtype) for i in range(cfg.n_layer)])
  keys = jax.random.split(key, cfg.n_layer + 1) if train else [None] * (cfg.n_layer + 1)
  x = embed(outer, input_ids)
  if train:
    x = nn.Dropout(cfg.dropout).apply({}, x, deterministic=False, rngs={"dropout": keys[-1]})
  block = Block(cfg, 0)

  def one(x, layer):
    p, k = layer
    return block.apply({"params": gather(p)}, x, train,
                       rngs={"dropout": k} if train else {}), None
  if cfg.remat == "block":  # keep only each block's input for the backward pass, as unrolled
    one = jax.checkpoint(one)
  x, _ = jax.lax.scan(one, x, (stacked, keys[:-1] if train else None))
  x = _layer_norm(cfg).apply({"params": outer["ln_f"]}, x)
  return x if hidden else head_logits(x, outer["wte"]["embedding"], cfg.dtype)


def head_logits(x, wte, dtype):
  """The tied LM head: logits = x @ wte^T [..., V] in the compute dtype."""
  dt = jnp.dtype(dtype)
  return jnp.dot(x.astype(dt), wte.astype(dt).T)


def embed(params, input_ids):
  """What GPT2 feeds its first block (no dropout): token + position embeddings [B, T, D]."""
  t = input_ids.shape[1]
  return (jnp.take(params["wte"]["embedding"], input_ids, axis=0)
          + params["wpe"]["embedding"][None, :t])


# --- the LM head's loss, without the [B, T, V] logits -------------------------------------
#
# Full float32 logits of GPT-2 XL at 4 x 1024 tokens are 0.8 GB per chip, and their gradient
# as much again. lm_head_nll computes the loss over chunks of LOSS_CHUNK positions instead
# (MaxText's vocabulary tiling, Levanter's blockwise cross-entropy), with its own backward pass:
# the forward pass already holds each chunk's softmax, so it computes the gradients there and
# then (no second LM-head matmul, unlike a checkpointed scan) and the backward pass only scales
# them by the incoming cotangent. Inside the head the vocabulary is padded to a multiple of
# VOCAB_MULTIPLE (50,257 -> 50,304: whole 128-lane tiles) with zero rows whose logits are -inf,
# so the loss is that of the real vocabulary; the parameters keep cfg.vocab_size rows, so
# checkpoints, exports and pruning never see the padding.
LOSS_CHUNK = 256
VOCAB_MULTIPLE = 128


def padded_vocab(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _chunks(a, chunk: int):
  """[B, T, ...] -> [T / chunk, B, chunk, ...] (T padded with zeros to a multiple of chunk)."""
  pad = -a.shape[1] % chunk
  a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  a = a.reshape(a.shape[0], -1, chunk, *a.shape[2:])
  return jnp.moveaxis(a, 1, 0)


def _unchunk(a, t: int):
  """The inverse of _chunks: [n, B, chunk, ...] -> [B, t, ...]."""
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :t]


def _chunk_logits(x, w, vocab_size: int, dtype):
  """float32 logits [B, c, Vp] of one chunk, as GPT2 computes them; padded columns are -inf."""
  logits = jnp.dot(x.astype(dtype), w.astype(dtype).T).astype(jnp.float32)
  return jnp.where(jnp.arange(w.shape[0]) < vocab_size, logits, -jnp.inf)


def _chunk_nll(logits, labels):
  lse = jax.nn.logsumexp(logits, axis=-1)
  return lse, lse - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]


def _head_setup(x, wte, labels, weights, chunk):
  vocab_size, t = wte.shape[0], x.shape[1]
  w = jnp.pad(wte, [(0, padded_vocab(vocab_size) - vocab_size), (0, 0)])
  xs = tuple(_chunks(a, min(chunk, t)) for a in (x, labels, weights))
  return vocab_size, t, w, xs


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_nll_sum(x, wte, labels, weights, dtype, chunk):
  return jnp.sum(lm_head_nll(x, wte, labels, dtype, chunk) * weights)


def _weighted_nll_sum_fwd(x, wte, labels, weights, dtype, chunk):
  vocab_size, t, w, xs = _head_setup(x, wte, labels, weights, chunk)
  dt = jnp.dtype(dtype)

  def one(dw, chunk_xs):
    xc, lc, wc = chunk_xs
    logits = _chunk_logits(xc, w, vocab_size, dt)
    lse, nll = _chunk_nll(logits, lc)
    # d sum(weights * nll) / d logits = weights * (softmax - onehot), taken in the compute
    # dtype into the two matmuls as autodiff of the full-logits model would.
    g = (jnp.exp(logits - lse[..., None])
         - jax.nn.one_hot(lc, w.shape[0], dtype=jnp.float32)) * wc[..., None]
    g = g.astype(dt)
    dx = jnp.dot(g, w.astype(dt), preferred_element_type=jnp.float32)
    dw = dw + jnp.einsum("bcv,bcd->vd", g, xc.astype(dt), preferred_element_type=jnp.float32)
    return dw, (nll, dx)

  dw, (nll, dx) = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), xs)
  nll = _unchunk(nll, t)
  residuals = (_unchunk(dx, t).astype(x.dtype), dw[:vocab_size].astype(wte.dtype), nll, labels)
  return jnp.sum(nll * weights), residuals


def _weighted_nll_sum_bwd(dtype, chunk, residuals, g):
  del dtype, chunk
  dx, dw, nll, labels = residuals
  zero_labels = np.zeros(labels.shape, jax.dtypes.float0)
  return g * dx, g * dw, zero_labels, g * nll


_weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd)


def lm_head_nll(x, wte, labels, dtype="float32", chunk: int = LOSS_CHUNK):
  """Per-position NLL [B, T] float32 of the tied LM head, chunk positions at a time.

  x: [B, T, D] the final LayerNorm's output; wte: [V, D]; labels: [B, T] int. Equal to
  evaluate.token_nll(x @ wte^T, labels) without holding [B, T, V]. Forward only: to train, use
  lm_head_loss, whose backward pass holds no full logits either.
  """
  vocab_size, t, w, (xc, lc, _) = _head_setup(x, wte, labels, labels, chunk)

  def one(_, chunk_xs):
    return None, _chunk_nll(_chunk_logits(chunk_xs[0], w, vocab_size, jnp.dtype(dtype)),
                            chunk_xs[1])[1]
  return _unchunk(jax.lax.scan(one, None, (xc, lc))[1], t)


def lm_head_loss(x, wte, labels, weights, dtype="float32", chunk: int = LOSS_CHUNK):
  """sum(weights * lm_head_nll(x, wte, labels)), a scalar, differentiable in x, wte, weights."""
  return _weighted_nll_sum(x, wte, labels, weights.astype(jnp.float32), str(jnp.dtype(dtype)),
                           chunk)


@dataclasses.dataclass(frozen=True)
class ModelFn:
  """GPT-2 of one config without dropout, as evaluation applies it.

  fn(params, input_ids [B, T]) -> logits [B, T, V]; fn.nll(params, input_ids, labels) ->
  per-position NLL [B, T] without full logits (what evaluation steps use). Equal configs give
  equal (hashing alike) objects, so the compiled steps built on them are reused."""
  cfg: GPT2Config

  def __call__(self, params, ids):
    return GPT2(self.cfg).apply({"params": params}, ids)

  def nll(self, params, ids, labels):
    if ids.shape[1] <= LOSS_CHUNK:  # one chunk: the plain program is as small, and faster
      return _chunk_nll(self(params, ids).astype(jnp.float32), labels)[1]
    x = GPT2(self.cfg).apply({"params": params}, ids, hidden=True)
    return lm_head_nll(x, params["wte"]["embedding"], labels, self.cfg.dtype)


@functools.lru_cache(maxsize=None)
def logits_fn(cfg: GPT2Config) -> ModelFn:
  """(params, input_ids [B, T]) -> logits [B, T, V], without dropout: what evaluation applies
  (a ModelFn: .nll gives the per-position loss without the logits)."""
  return ModelFn(cfg)


def init_params(cfg: GPT2Config, seed: int):
  """Random GPT-2 parameters (plain nested dict of float32 arrays) with GPT-2's initialisation."""
  model = GPT2(cfg)
  # One compiled program: op-by-op eager init costs seconds of dispatch even for tiny models.
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
  return jax.tree.map(lambda x: x, nn.unbox(params))  # plain dicts, no FrozenDict/boxes


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def init_shapes(cfg: GPT2Config):
  """The parameter tree's shapes and dtypes (jax.ShapeDtypeStruct leaves), without allocating."""
  model = GPT2(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  return nn.unbox(shapes["params"])
