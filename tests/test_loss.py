"""The LM head's chunked loss (model.lm_head_nll / lm_head_loss) against full logits."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockprune_jax import evaluate as eval_lib
from blockprune_jax import model as model_lib

# vocab 300 pads to 384 inside the head; T = 41 is no multiple of the chunk of 16.
CFG = model_lib.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                           dropout=0.0)


def _data():
  r = np.random.RandomState(0)
  ids, labels = (r.randint(0, 300, (3, 41)).astype(np.int32) for _ in range(2))
  return ids, labels, r.rand(3, 41).astype(np.float32)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


@pytest.mark.parametrize("chunk", [16, 41, 256])
def test_chunked_loss_and_gradients_equal_full_logits(chunk):
  params = model_lib.init_params(CFG, 0)
  ids, labels, weights = _data()
  model = model_lib.GPT2(CFG)

  def full(p, w):
    return jnp.sum(eval_lib.token_nll(model.apply({"params": p}, ids), labels) * w)

  def chunked(p, w):
    x = model.apply({"params": p}, ids, hidden=True)
    return model_lib.lm_head_loss(x, p["wte"]["embedding"], labels, w, chunk=chunk)

  want, (g_want, gw_want) = jax.value_and_grad(full, argnums=(0, 1))(params, weights)
  got, (g_got, gw_got) = jax.value_and_grad(chunked, argnums=(0, 1))(params, weights)
  assert abs(float(got) - float(want)) / abs(float(want)) < 1e-6
  worst = max(jax.tree.leaves(jax.tree.map(_rel, g_want, g_got)))
  assert worst < 1e-5, worst
  assert _rel(gw_want, gw_got) < 1e-5  # d loss / d weights = the per-token NLL


def test_padded_vocabulary_is_masked():
  """The head pads 300 -> 384 rows; the padded logits must not leak into the normaliser."""
  assert model_lib.padded_vocab(50257) == 50304 and model_lib.padded_vocab(384) == 384
  params = model_lib.init_params(CFG, 0)
  ids, labels, _ = _data()
  fn = model_lib.logits_fn(CFG)
  want = eval_lib.token_nll(fn(params, ids), labels)
  x = model_lib.GPT2(CFG).apply({"params": params}, ids, hidden=True)
  got = model_lib.lm_head_nll(x, params["wte"]["embedding"], labels, chunk=16)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  got = fn.nll(params, ids, labels)  # 41 positions: one chunk, the plain program
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_bfloat16_chunked_loss_is_close():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  params = model_lib.init_params(cfg, 0)
  ids, labels, weights = _data()
  full = jnp.sum(eval_lib.token_nll(model_lib.logits_fn(cfg)(params, ids), labels) * weights)
  chunked = jnp.sum(model_lib.logits_fn(cfg).nll(params, ids, labels) * weights)
  assert abs(float(chunked) - float(full)) / float(full) < 1e-3


def test_remat_block_changes_nothing_but_memory():
  params = model_lib.init_params(CFG, 0)
  ids, labels, weights = _data()

  def loss(cfg):
    def f(p):
      x = model_lib.GPT2(cfg).apply({"params": p}, ids, hidden=True)
      return model_lib.lm_head_loss(x, p["wte"]["embedding"], labels, weights)
    return jax.value_and_grad(f)(params)
  (a, ga), (b, gb) = loss(CFG), loss(dataclasses.replace(CFG, remat="block"))
  assert abs(float(a) - float(b)) <= 1e-6 * abs(float(a))
  assert max(jax.tree.leaves(jax.tree.map(_rel, ga, gb))) < 1e-5


@pytest.mark.parametrize("remat", ["none", "block"])
def test_scanned_blocks_equal_unrolled(remat):
  """model.scan_layers runs the same function as one lax.scan over the stacked blocks."""
  cfg = dataclasses.replace(CFG, n_layer=3, remat=remat)
  params = model_lib.init_params(cfg, 0)
  ids, labels, weights = _data()

  def loss(c):
    def f(p):
      x = model_lib.forward(c, p, ids, hidden=True)
      return model_lib.lm_head_loss(x, p["wte"]["embedding"], labels, weights)
    return jax.value_and_grad(f)(params)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  assert scanned.scanned and not cfg.scanned
  np.testing.assert_allclose(model_lib.forward(scanned, params, ids),
                             model_lib.forward(cfg, params, ids), rtol=1e-5, atol=1e-5)
  (a, ga), (b, gb) = loss(cfg), loss(scanned)
  assert abs(float(a) - float(b)) <= 1e-6 * abs(float(a))
  assert max(jax.tree.leaves(jax.tree.map(_rel, ga, gb))) < 1e-5


def test_scan_with_dropout_draws_per_block_and_compacted_models_unroll():
  cfg = dataclasses.replace(CFG, n_layer=2, dropout=0.5, scan_layers=True)
  params = model_lib.init_params(cfg, 0)
  ids = _data()[0]
  key = jax.random.PRNGKey(3)
  a = model_lib.forward(cfg, params, ids, train=True, key=key, hidden=True)
  b = model_lib.forward(cfg, params, ids, train=True, key=key, hidden=True)
  c = model_lib.forward(cfg, params, ids, train=True, key=jax.random.PRNGKey(4), hidden=True)
  clean = model_lib.forward(cfg, params, ids, hidden=True)
  np.testing.assert_array_equal(a, b)  # the key decides the draws
  assert not np.allclose(a, c) and not np.allclose(a, clean)
  # Blocks of different widths (a compacted model) cannot be stacked: those run unrolled.
  assert not dataclasses.replace(cfg, mlp_widths=(64, 96)).scanned
