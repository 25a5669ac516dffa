"""Exact perplexity over sliding windows (README, "What is computed, exactly"), data-parallel.

Each device returns sums (NLL, tokens); the host adds them in float64 and divides once, so
neither padding nor the device count changes the result.
"""
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from blockprune_jax import parallel
from blockprune_jax.errors import UserError


def eval_windows(stream: np.ndarray, seq_len: int, stride: int):
  """(inputs, labels, weights), each [num_windows, seq_len]: windows start at 0, S, 2S, ...
  until one reaches the end; position j of the window at s reads token s + j and is scored on
  label s + j + 1 when weights[w, j] == 1 (targets max(s + 1, prev_end) <= t < min(s + L, N))."""
  n, L, S = len(stream), seq_len, stride
  if not 0 < S <= L:
    raise ValueError(f"eval.stride must be in [1, seq_len={L}], got {S}")
  starts = range(0, max(n - L, 0) + S, S)  # the last one reaches the end
  inputs = np.zeros((len(starts), L), np.int32)
  labels = np.zeros((len(starts), L), np.int32)
  weights = np.zeros((len(starts), L), np.float32)
  prev_end = 0
  for w, s in enumerate(starts):
    end = min(s + L, n)
    inputs[w, :end - s] = stream[s:end]
    labels[w, :end - s - 1] = stream[s + 1:end]
    first = max(s + 1, prev_end)  # first scored target token
    weights[w, first - s - 1:end - s - 1] = 1.0
    prev_end = end
  return inputs, labels, weights


def token_nll(logits, labels):
  """Per-position negative log-likelihood in float32. logits [..., V], labels [...] -> [...]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked


@functools.lru_cache(maxsize=None)
def make_eval_step(apply_fn, mesh):
  """(params, inputs, labels, weights) -> (sum NLL, tokens), inputs sharded over every device;
  cached per (apply_fn (model.logits_fn's), mesh)."""
  spec = P(parallel.batch_axes(mesh))
  return jax.jit(parallel.shard_map(device_eval_step(apply_fn, mesh), mesh,
                                    (P(), spec, spec, spec), (P(), P())))


def device_eval_step(apply_fn, mesh):
  axes = parallel.batch_axes(mesh)

  def eval_step(params, inputs, labels, weights):
    if hasattr(apply_fn, "nll"):  # a model.ModelFn: without the full logits
      nll = apply_fn.nll(params, inputs, labels)
    else:
      nll = token_nll(apply_fn(params, inputs), labels)
    return jax.lax.psum(jnp.sum(nll * weights), axes), jax.lax.psum(jnp.sum(weights), axes)
  return eval_step


def evaluate(apply_fn, params, stream, *, seq_len, stride, batch_size, mesh=None,
             desc="eval", progress=True, step_fn=None):
  """Perplexity of `stream` (1-D int array): {loss, perplexity, tokens_scored, tokens_per_s
  (after the first, compiling, batch), ...}. A step_fn whose sums are [K] (K models mapped over)
  gives K dicts, with the program's times (tokens_per_s counts every model's tokens)."""
  mesh = mesh or parallel.data_mesh()
  if len(stream) < 2:
    raise UserError(f"{desc}: {len(stream)} token(s) to evaluate, at least 2 are needed: check "
                    "the split's text or raise eval.max_tokens")
  inputs, labels, weights = eval_windows(np.asarray(stream), seq_len, stride)
  n_win = len(inputs)
  batch = parallel.round_up(max(1, min(batch_size, n_win)), mesh.devices.size)
  total = parallel.round_up(n_win, batch)
  pad = ((0, total - n_win), (0, 0))  # padded windows carry weight 0: they add nothing
  inputs, labels, weights = (np.pad(a, pad) for a in (inputs, labels, weights))
  step = step_fn or make_eval_step(apply_fn, mesh)
  params = parallel.replicate(params, mesh)

  def shard(i):
    window = slice(i, i + batch)
    return parallel.shard_batch((inputs[window], labels[window], weights[window]), mesh)

  # The first batch compiles (once per shape); throughput is timed over the batches after it.
  t_start = time.time()
  nll_sum, count = _add(step(params, *shard(0)), 0.0, 0.0)  # [K] each for K models
  t_first = time.time() - t_start
  bar = progress_bar(total // batch, desc, progress)
  bar.update(1)
  t0 = time.time()
  pending = []
  for i in range(batch, total, batch):
    pending.append(step(params, *shard(i)))
    if len(pending) > 2:  # keep the device busy but read results back as we go
      nll_sum, count = _add(pending.pop(0), nll_sum, count)
    bar.update(1)
    if bar.n % 10 == 0:
      bar.set_postfix(tok_s=f"{((bar.n - 1) * batch * seq_len) / max(time.time() - t0, 1e-9):,.0f}")
  for r in pending:
    nll_sum, count = _add(r, nll_sum, count)
  after_first = time.time() - t0
  bar.close()
  if total > batch:  # device throughput (padding windows included), compilation excluded
    tokens_per_s = (total - batch) * seq_len / max(after_first, 1e-9)
  else:  # a single batch: its time includes compilation
    tokens_per_s = batch * seq_len / max(t_first, 1e-9)
  seconds = time.time() - t_start

  def result(nll_sum, count, n_models):
    loss = nll_sum / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"),
            "tokens_scored": int(round(count)), "tokens": int(len(stream)), "windows": n_win,
            "tokens_per_s": tokens_per_s * n_models, "seconds": seconds, "first_batch_s": t_first}
  if np.ndim(nll_sum) == 0:
    return result(float(nll_sum), float(count), 1)
  return [result(float(s), float(c), len(nll_sum)) for s, c in zip(nll_sum, count)]


def _add(result, nll_sum, count):
  s, c = jax.device_get(result)
  return nll_sum + np.asarray(s, np.float64), count + np.asarray(c, np.float64)


def progress_bar(total, desc, enabled):
  """A progress bar on a terminal; none in log files (tqdm's disable=None: off without a TTY)."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  off = not enabled or jax.process_index() != 0 or total < 2
  return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=True if off else None)
