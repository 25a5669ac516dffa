"""Zero-shot tasks: our Flax GPT-2 inside EleutherAI's lm-evaluation-harness (docs/tasks.md).

`FlaxLM` is the harness's `LM` interface, building requests as its Hugging Face backend `HFLM`
does (the tests compare the two). Requests are padded to a few bucket lengths and one batch size,
so a task compiles once per bucket, not once per batch.
"""
import contextlib
import difflib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from blockprune_jax import compile_stats
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax.errors import UserError

try:  # optional (the `tasks` extra): without it, asking for eval.tasks is one line
  from lm_eval.api.model import TemplateLM
except ImportError:
  TemplateLM = object

LM_EVAL = "lm-eval==0.4.13"  # the version requirements.txt pins and the tests check against
MIN_BUCKET = 16  # shortest padded length: shorter requests share one program
# Bootstrap draws for the stderr of non-mean metrics (perplexities): the harness's default of
# 100000 takes minutes on LAMBADA; 1000 puts the stderr within a few percent of its own.
BOOTSTRAP_ITERS = 1000
_ROWS = P(parallel.AXIS)  # requests are independent rows, split over the devices


def _harness():
  """The lm_eval package, or one line saying how to install it."""
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel
    import lm_eval.api.model  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise UserError(f"eval.tasks needs lm-evaluation-harness: pip install '{LM_EVAL}' (or "
                    "pip install -e '.[tasks]')") from None
  return lm_eval


def bucket(n: int, max_len: int) -> int:
  """The padded length of an n-token request: the next power of two >= MIN_BUCKET, <= max_len."""
  return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_len)


@functools.lru_cache(maxsize=None)
def make_score_step(apply_fn, mesh):
  """(params, inputs, targets, weights) [B, T] -> (sum of the weighted targets' log
  probabilities [B], whether every weighted target is the argmax [B])."""
  def score_step(params, inputs, targets, weights):
    logits = apply_fn(params, inputs).astype(jnp.float32)
    logprob = -eval_lib.token_nll(logits, targets)
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(logprob * weights, axis=-1), jnp.all(greedy, axis=-1)

  return jax.jit(parallel.shard_map(score_step, mesh, (P(), _ROWS, _ROWS, _ROWS), (_ROWS, _ROWS)))


@functools.lru_cache(maxsize=None)
def make_next_token_step(apply_fn, mesh):
  """(params, tokens [B, T], lengths [B]) -> the greedy token after each row's first lengths[b]
  tokens (causal attention: the padding after them is unseen)."""
  def next_token_step(params, tokens, lengths):
    logits = apply_fn(params, tokens)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last.astype(jnp.float32), axis=-1).astype(jnp.int32)

  return jax.jit(parallel.shard_map(next_token_step, mesh, (P(), _ROWS, _ROWS), _ROWS))


class FlaxLM(TemplateLM):
  """Our GPT-2 (params already masked) as a harness model."""

  def __init__(self, params, model_cfg, tokenizer, mesh=None, batch_size=8, progress=True):
    _harness()  # without it, one line saying how to install it
    super().__init__()
    self.mesh = mesh or parallel.data_mesh()
    self.apply_fn = model_lib.logits_fn(model_cfg)
    self.params = parallel.replicate(params, self.mesh)
    self.tokenizer = tokenizer
    self.max_length = model_cfg.n_positions
    self.max_gen_toks = 256  # HFLM's default when a task names none
    self.batch = parallel.round_up(max(1, batch_size), self.mesh.devices.size)
    self.progress = progress

  @property
  def eot_token_id(self):
    return self.tokenizer.eos_token_id

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    # GPT-2 adds no special tokens; the harness places the end-of-text prefix itself.
    return list(self.tokenizer.encode(string, add_special_tokens=False))

  def tok_decode(self, tokens):
    return self.tokenizer.decode(tokens, skip_special_tokens=True)

  def loglikelihood(self, requests, disable_tqdm=False):
    return super().loglikelihood(requests, disable_tqdm=True)  # our own bar below

  def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
    """[(logprob, is_greedy)] of (key, context_ids, continuation_ids) requests, left-truncated
    to n_positions + 1 tokens as HFLM does."""
    rows = []
    for _, context, continuation in requests:
      if not context or not continuation or len(continuation) > self.max_length:
        raise ValueError("a request needs a context and 1..n_positions continuation tokens")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    step = make_score_step(self.apply_fn, self.mesh)
    pending = []
    for idx, length in self._batches([len(r[0]) for r in rows], "loglikelihood"):
      inputs = np.zeros((self.batch, length), np.int32)
      targets = np.zeros((self.batch, length), np.int32)
      weights = np.zeros((self.batch, length), np.float32)
      for r, i in enumerate(idx):
        x, y, n = rows[i]
        inputs[r, :len(x)], targets[r, :len(y)] = x, y
        weights[r, len(x) - n:len(x)] = 1.0
      pending.append((idx, step(self.params, *parallel.shard_batch(
          (inputs, targets, weights), self.mesh))))
    out = [None] * len(rows)
    for idx, result in pending:
      logprob, greedy = jax.device_get(result)
      for r, i in enumerate(idx):
        out[i] = (float(logprob[r]), bool(greedy[r]))
    return out

  def _batches(self, lengths, desc):
    """Yields (row indices, padded length) per batch, longest rows first, under a progress bar."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    starts = range(0, len(order), self.batch)
    bar = eval_lib.progress_bar(len(starts), desc, self.progress)
    for s in starts:
      yield order[s:s + self.batch], bucket(lengths[order[s]], self.max_length)
      bar.update(1)
    bar.close()

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """Total log probability of each whole text, over the harness's rolling windows."""
    from lm_eval import utils  # pylint: disable=import-outside-toplevel
    windows, owner = [], []
    for k, (text,) in enumerate(req.args for req in requests):
      for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owner.append(k)
    totals = [0.0] * len(requests)
    for k, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
      totals[k] += logprob
    return totals

  def generate_until(self, requests, disable_tqdm=False):
    """Greedy continuations cut at the first stop sequence (the task's `until` and the
    end-of-text token), at most max_gen_toks tokens, each as HFLM.generate_until builds it."""
    from lm_eval.models import utils as hf_utils  # pylint: disable=import-outside-toplevel
    eos = self.tokenizer.decode([self.eot_token_id])
    jobs = []
    for context, gen_kwargs in (req.args for req in requests):
      kwargs = hf_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
      until = hf_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      n_new = kwargs.pop("max_gen_toks")
      if n_new >= self.max_length:
        raise UserError(f"a task asks for max_gen_toks={n_new}, not fewer than the model's "
                        f"n_positions={self.max_length}")
      jobs.append((self.tok_encode(context)[-(self.max_length - n_new):], until, n_new))
    out = [None] * len(jobs)
    for idx, length in self._batches([len(c) + n for c, _, n in jobs], "generate"):
      for i, new in zip(idx, self._generate([jobs[i] for i in idx], length)):
        out[i] = hf_utils.postprocess_generated_text(self.tok_decode(new), jobs[i][1], None)
    return out

  def _generate(self, jobs, length):
    """The new token ids of each (context ids, stop strings, max new tokens) job."""
    step = make_next_token_step(self.apply_fn, self.mesh)
    tokens = np.zeros((self.batch, length), np.int32)
    lengths = np.ones((self.batch,), np.int32)  # padding rows: one token, never read
    for r, (context, _, _) in enumerate(jobs):
      tokens[r, :len(context)], lengths[r] = context, len(context)
    new = [[] for _ in jobs]
    active = set(range(len(jobs)))
    while active:
      nxt = jax.device_get(step(self.params, *parallel.shard_batch((tokens, lengths), self.mesh)))
      for r in sorted(active):
        _, until, n_new = jobs[r]
        if int(nxt[r]) == self.eot_token_id:
          active.discard(r)
          continue
        new[r].append(int(nxt[r]))
        tokens[r, lengths[r]] = nxt[r]
        lengths[r] += 1
        text = self.tok_decode(new[r])
        if len(new[r]) >= n_new or any(s and s in text for s in until):
          active.discard(r)
    return new


def task_names(config) -> list[str]:
  """eval.tasks, also in the flag form --config.eval.tasks=piqa,hellaswag."""
  return split_names(config.eval.tasks)


def split_names(items) -> list[str]:
  """('a,b', 'c') -> ['a', 'b', 'c']: a tuple key given in the flag form or element by element."""
  return [t.strip() for item in items for t in item.split(",") if t.strip()]


@functools.lru_cache(maxsize=None)
def task_manager(task_dir: str = ""):
  """The harness's TaskManager with eval.task_dir's YAMLs, once per process (it takes seconds)."""
  _harness()
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  if task_dir and not os.path.isdir(os.path.expanduser(task_dir)):
    raise UserError(f"eval.task_dir={task_dir!r} is not a directory: give the directory that "
                    "holds your task YAML files, or '' for the harness's own tasks")
  return TaskManager(include_path=os.path.expanduser(task_dir) if task_dir else None)


def check_task_names(config) -> None:
  """One line naming the first unknown name of eval.tasks and its nearest matches."""
  known = set(task_manager(config.eval.task_dir).all_tasks)
  for name in task_names(config):
    if name not in known:
      near = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
      raise UserError(f"eval.tasks: unknown task {name!r}"
                      + (f"; did you mean {', '.join(near)}?" if near else "")
                      + (f" (tasks from eval.task_dir={config.eval.task_dir!r} included)"
                         if config.eval.task_dir else
                         " (local tasks: set eval.task_dir to their YAML directory)"))


def load_tasks(config) -> list:
  """The Task / Group objects of eval.tasks with their datasets, once per process. Loaded before
  training, so an unreadable dataset fails then, not after hours of fine-tuning."""
  if not task_names(config):
    return []
  check_task_names(config)
  return list(_load(tuple(task_names(config)), config.eval.task_dir))


@functools.lru_cache(maxsize=None)
def _load(names, task_dir) -> tuple:
  objects = []
  for name in names:
    try:
      loaded = task_manager(task_dir).load(name)
    except (ConnectionError, OSError) as e:  # datasets / huggingface_hub raise these offline
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise UserError(f"eval.tasks: task {name!r} could not load its dataset ({first}): hub "
                      "datasets need network access once (the datasets cache then serves them "
                      "offline); local tasks read the files their YAML names") from None
    if name in loaded["groups"]:
      objects.append(loaded["groups"][name])
    else:  # a task, or a tag: its tasks
      objects.extend(loaded["tasks"].values())
  return tuple(objects)


@contextlib.contextmanager
def _serial_bootstrap():
  """The harness bootstraps stderrs in a multiprocessing pool; forking a process whose JAX
  runtime holds threads can hang, so it runs in this process (its DISABLE_MULTIPROC switch)."""
  before = os.environ.get("DISABLE_MULTIPROC")
  os.environ["DISABLE_MULTIPROC"] = "1"
  try:
    yield
  finally:
    if before is None:
      os.environ.pop("DISABLE_MULTIPROC", None)
    else:
      os.environ["DISABLE_MULTIPROC"] = before


def metrics_of(entry: dict) -> dict:
  """{'acc,none': 0.5, 'acc_stderr,none': 'N/A', 'alias': ...} -> {'acc': 0.5, 'acc_stderr': None};
  another filter than `none` keeps its name: 'exact_match,strict-match'."""
  out = {}
  for key, value in entry.items():
    if "," not in key:
      continue  # alias, sample counts
    metric, filt = key.split(",", 1)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    out[metric if filt == "none" else key] = float(value) if number else None
  return out


def _shown(metrics: dict):
  """(metric, value) pairs a console line shows: values, no stderrs."""
  return [(m, v) for m, v in metrics.items() if v is not None and not m.endswith("_stderr")]


def score_tasks(config, params, model_cfg, tokenizer, mesh, log, label="") -> dict:
  """{task: {metric: value, metric_stderr: value}} of eval.tasks for these (masked) params,
  logged as one 'tasks' event; `label` names the stage ('one-shot')."""
  lm_eval = _harness()
  loaded = load_tasks(config)
  lm = FlaxLM(params, model_cfg, tokenizer, mesh, config.eval.batch_size)
  with compile_stats.counting() as compiled, _serial_bootstrap():
    out = lm_eval.simple_evaluate(
        model=lm, tasks=loaded, num_fewshot=config.eval.num_fewshot,
        limit=config.eval.task_limit or None, task_manager=task_manager(config.eval.task_dir),
        log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
  scores = {task: metrics_of(entry) for task, entry in out["results"].items()}
  shown = "; ".join(f"{t} " + ", ".join(f"{m} {v:.4f}" for m, v in _shown(s))
                    for t, s in scores.items())
  log.event("tasks", f"{label + ' ' if label else ''}tasks: {shown} ({compiled['compilations']} "
            "compilation(s))", label=label or "final", tasks=scores,
            compilations=compiled["compilations"])
  return scores


def score_run(prep, params, oneshot: bool) -> dict:
  """results.json's `tasks` of the final params and, with `oneshot`, `oneshot_tasks` of the
  pruned params (prep.params); {} when eval.tasks is empty."""
  if not task_names(prep.config):
    return {}
  mesh, out = parallel.data_mesh(), {}
  if oneshot:
    out["oneshot_tasks"] = score_tasks(prep.config, prep.params, prep.model_cfg, prep.tok, mesh,
                                       prep.log, label="one-shot")
  out["tasks"] = score_tasks(prep.config, params, prep.model_cfg, prep.tok, mesh, prep.log)
  return out


def summary_lines(results: dict) -> list[str]:
  """A run's console lines of its task scores: 'piqa  acc 0.6230 (one-shot 0.5810)'."""
  lines, oneshot = [], results.get("oneshot_tasks") or {}
  for task, metrics in (results.get("tasks") or {}).items():
    cells = [f"{m} {v:.4f}" + (f" (one-shot {oneshot[task][m]:.4f})"
                               if oneshot.get(task, {}).get(m) is not None else "")
             for m, v in _shown(metrics)]
    lines.append(f"{task:<24}" + "  ".join(cells))
  return lines
