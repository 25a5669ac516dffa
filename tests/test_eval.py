"""Perplexity windows against a direct PyTorch loop; independence of devices and batch size."""
import math

import jax
import numpy as np
import pytest

from blockprune_jax import evaluate as eval_lib
from blockprune_jax import hf_io
from blockprune_jax import model as model_lib


def torch_reference(model_dir, stream, seq_len, stride):
  """The Hugging Face perplexity-guide loop, summing NLL exactly: (ppl, tokens scored)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval().double()
  ids = torch.tensor(stream)[None]
  n = ids.shape[1]
  nll, count, prev_end = 0.0, 0, 0
  for begin in range(0, n, stride):
    end = min(begin + seq_len, n)
    trg_len = end - prev_end
    window = ids[:, begin:end]
    target = window.clone()
    target[:, :-trg_len] = -100
    with torch.no_grad():
      logp = torch.log_softmax(model(window).logits[:, :-1], -1)
    labels = target[:, 1:]
    keep = labels != -100
    nll -= logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][keep].sum().item()
    count += int(keep.sum())
    prev_end = end
    if end == n:
      break
  return math.exp(nll / count), count


@pytest.fixture(scope="module")
def tiny(hf_tiny_dir):
  cfg = hf_io.load_config(hf_tiny_dir)
  params = hf_io.load_params(hf_tiny_dir, cfg)
  # What the pipeline evaluates with: its NLL comes from model.lm_head_nll, never full logits.
  return hf_tiny_dir, params, model_lib.logits_fn(cfg)


@pytest.mark.parametrize("n,seq_len,stride", [(300, 32, 32), (300, 32, 12), (64, 32, 32), (65, 32, 7)])
def test_windows_match_torch_loop(tiny, n, seq_len, stride):
  model_dir, params, apply_fn = tiny
  stream = np.random.RandomState(n).randint(0, 50257, n).astype(np.int32)
  ours = eval_lib.evaluate(apply_fn, params, stream, seq_len=seq_len, stride=stride,
                           batch_size=3, progress=False)
  ppl, count = torch_reference(model_dir, stream, seq_len, stride)
  assert ours["tokens_scored"] == count
  assert abs(ours["perplexity"] - ppl) / ppl < 1e-4


def test_every_token_scored_at_most_once():
  for n, L, S in [(100, 10, 10), (100, 10, 3), (101, 16, 5), (10, 16, 4)]:
    stream = np.arange(n)
    _, labels, weights = eval_lib.eval_windows(stream, L, S)
    scored = labels[weights > 0]
    assert len(scored) == len(set(scored.tolist()))
    # Overlapping windows score every token but the first; non-overlapping blocks leave
    # each block's first token unscored.
    assert len(scored) == (n - math.ceil(n / L) if S == L else n - 1)


def test_devices_and_batch_size_do_not_change_result(tiny):
  _, params, apply_fn = tiny
  assert jax.device_count() == 4, "conftest sets four fake CPU devices"
  stream = np.random.RandomState(1).randint(0, 50257, 500).astype(np.int32)
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  runs = [eval_lib.evaluate(apply_fn, params, stream, seq_len=32, stride=16, batch_size=b,
                            mesh=m, progress=False)
          for b, m in [(1, one), (5, one), (4, None), (7, None)]]
  for r in runs[1:]:
    assert r["tokens_scored"] == runs[0]["tokens_scored"]
    assert abs(r["loss"] - runs[0]["loss"]) < 1e-6
