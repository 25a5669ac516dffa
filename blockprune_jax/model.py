"""GPT-2 in Flax linen, named like Hugging Face's so checkpoints map by name.

Parameters: {'wte', 'wpe', 'h_0' ... 'h_{n-1}', 'ln_f'}; each block
{'ln_1', 'attn': {'c_attn', 'c_proj'}, 'ln_2', 'mlp': {'c_fc', 'c_proj'}}.
Dense kernels are [in, out], the layout of HF's Conv1D weights, so import is a rename.
Parameters are float32; `dtype` is the compute dtype of the matrix multiplies.
"""
import dataclasses
import functools
import math
from typing import Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

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

  def mlp_width(self, layer: int) -> int:
    return self.mlp_widths[layer] if self.mlp_widths else 4 * self.n_embd


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


@functools.lru_cache(maxsize=None)
def _cudnn_ok() -> bool:
  return jax.default_backend() == "gpu"


def attention(q, k, v, cfg: GPT2Config):
  """Causal attention. q, k, v: [batch, time, heads, head_dim]."""
  impl = cfg.attention
  if impl == "auto":
    # cuDNN's fused kernel is ~2x XLA's on H100 (README, "Speed") but wants half precision.
    impl = "cudnn" if _cudnn_ok() and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    except Exception as e:  # pylint: disable=broad-except
      if cfg.attention == "cudnn":
        raise
      _warn_xla_fallback(type(e).__name__)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


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


class Block(nn.Module):
  cfg: GPT2Config
  layer: int

  @nn.compact
  def __call__(self, x, train: bool):
    cfg = self.cfg
    # LayerNorm in float32 and a float32 residual stream, as under PyTorch autocast.
    ln = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_epsilon, dtype=jnp.float32)
    drop = nn.Dropout(cfg.dropout, deterministic=not train)
    x = x + drop(Attention(cfg, name="attn")(ln(name="ln_1")(x))).astype(jnp.float32)
    h = MLP(cfg, cfg.mlp_width(self.layer), name="mlp")(ln(name="ln_2")(x))
    return x + drop(h).astype(jnp.float32)


class GPT2(nn.Module):
  """input_ids [batch, time] int -> logits [batch, time, vocab] in the compute dtype."""
  cfg: GPT2Config

  @nn.compact
  def __call__(self, input_ids, train: bool = False):
    cfg = self.cfg
    t = input_ids.shape[1]
    if t > cfg.n_positions:
      raise ValueError(f"sequence of {t} tokens exceeds n_positions={cfg.n_positions}")
    init = nn.initializers.normal(0.02)
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=init, name="wpe")
    x = wte(input_ids) + wpe(jnp.arange(t)[None])
    x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
    for i in range(cfg.n_layer):
      x = Block(cfg, i, name=f"h_{i}")(x, train)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=jnp.float32, name="ln_f")(x)
    # Tied LM head: logits = x @ wte^T.
    dt = jnp.dtype(cfg.dtype)
    return jnp.dot(x.astype(dt), wte.embedding.astype(dt).T)


def embed(params, input_ids):
  """What GPT2 feeds its first block (no dropout): token + position embeddings [B, T, D]."""
  t = input_ids.shape[1]
  return (jnp.take(params["wte"]["embedding"], input_ids, axis=0)
          + params["wpe"]["embedding"][None, :t])


@functools.lru_cache(maxsize=None)
def logits_fn(cfg: GPT2Config):
  """(params, input_ids [B, T]) -> logits [B, T, V], without dropout: what evaluation applies.

  One function object per config, so the compiled steps built on it can be reused."""
  model = GPT2(cfg)
  return lambda params, ids: model.apply({"params": params}, ids)


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
