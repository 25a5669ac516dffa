"""Our Flax GPT-2 against transformers' PyTorch GPT-2: import, logits, export, round trip."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from blockprune_jax import hf_io
from blockprune_jax import model as model_lib
from blockprune_jax.errors import UserError


def _torch_logits(model_dir, ids):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  m = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
  with torch.no_grad():
    return m(torch.tensor(ids)).logits.numpy()


def test_logits_match_transformers(hf_tiny_dir, rng):
  cfg = hf_io.load_config(hf_tiny_dir)
  params = hf_io.load_params(hf_tiny_dir, cfg)
  ids = rng.randint(0, cfg.vocab_size, (2, 40))
  ours = np.asarray(model_lib.GPT2(cfg).apply({"params": params}, jnp.asarray(ids)))
  ref = _torch_logits(hf_tiny_dir, ids)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() < 1e-4


def test_export_loads_in_transformers_and_round_trips(hf_tiny_dir, tmp_path, rng):
  cfg = hf_io.load_config(hf_tiny_dir)
  params = hf_io.load_params(hf_tiny_dir, cfg)
  out = hf_io.export(params, cfg, str(tmp_path / "export"))
  ids = rng.randint(0, cfg.vocab_size, (2, 24))
  np.testing.assert_array_equal(_torch_logits(out, ids), _torch_logits(hf_tiny_dir, ids))
  again = hf_io.load_params(out, hf_io.load_config(out))
  jax.tree.map(np.testing.assert_array_equal, again, params)  # import o export is the identity


def test_pytorch_bin_checkpoint(hf_tiny_dir, tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  m = transformers.GPT2LMHeadModel.from_pretrained(hf_tiny_dir)
  d = tmp_path / "bin"
  d.mkdir()
  m.config.save_pretrained(d)
  torch.save(m.state_dict(), d / "pytorch_model.bin")  # includes lm_head and attn buffers
  cfg = hf_io.load_config(str(d))
  a = hf_io.load_params(str(d), cfg)
  b = hf_io.load_params(hf_tiny_dir, cfg)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_bfloat16_compute_is_close(hf_tiny_dir, rng):
  cfg = hf_io.load_config(hf_tiny_dir)
  params = hf_io.load_params(hf_tiny_dir, cfg)
  ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 16)))
  f32 = model_lib.GPT2(cfg).apply({"params": params}, ids)
  bf16 = model_lib.GPT2(cfg.__class__(**{**cfg.__dict__, "dtype": "bfloat16"})).apply(
      {"params": params}, ids)
  assert bf16.dtype == jnp.bfloat16
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), atol=0.1)


def test_presets_and_shapes():
  cfg = model_lib.preset("gpt2")
  shapes = model_lib.init_shapes(cfg)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert n == 124_439_808  # GPT-2 small without the tied head, as Hugging Face counts it
  assert shapes["h_0"]["mlp"]["c_fc"]["kernel"].shape == (768, 3072)


def test_bad_checkpoint_dir_is_one_clear_error(tmp_path):
  with pytest.raises(UserError, match="config.json"):
    hf_io.resolve_dir(str(tmp_path))


def test_scratch_init_scales_residual_projections():
  # GPT-2's init: N(0, 0.02) for every matrix but the two that write into the residual stream,
  # N(0, 0.02 / sqrt(2 * n_layer)). Narrow, so init is fast; 12 layers give ~250k samples.
  cfg = model_lib.GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=12, n_head=4)
  params = model_lib.init_params(cfg, seed=0)
  def std(module, dense):
    return np.concatenate([np.asarray(params[f"h_{l}"][module][dense]["kernel"]).ravel()
                           for l in range(12)]).std()
  scaled = 0.02 / np.sqrt(2 * 12)
  for module in ("attn", "mlp"):
    assert abs(std(module, "c_proj") / scaled - 1) < 0.05
  assert abs(std("mlp", "c_fc") / 0.02 - 1) < 0.05
  assert abs(std("attn", "c_attn") / 0.02 - 1) < 0.05
