"""Zero-shot tasks: our Flax GPT-2 inside EleutherAI's lm-evaluation-harness (`lm-eval`).

`FlaxLM` is the harness's `LM` interface over `model.logits_fn`: `loglikelihood` (sum of log
probabilities and whether greedy decoding reproduces the continuation), `loglikelihood_rolling`
(the harness's rolling windows of at most n_positions tokens behind an end-of-text prefix, as its
Hugging Face backend `HFLM` builds them) and `generate_until` (greedy). Requests are sorted by
length and padded to a few bucket lengths (powers of two up to n_positions) and one fixed batch
(eval.batch_size rounded up to the device count), so a task compiles once per bucket, not once per
batch; each batch is split over the 'data' mesh axis like evaluate.py's windows.

`score_tasks` is what the pipeline calls: the tasks of eval.tasks through the harness's
TaskManager (eval.task_dir adds local task YAMLs) and `simple_evaluate`, returned as
{task: {metric: value, metric_stderr: value}} with the harness's filter suffix dropped
(`acc,none` -> `acc`; another filter keeps its name: `exact_match,strict-match`).
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
  """The padded length of an n-token request: the next power of two >= MIN_BUCKET, at most
  max_len (n_positions)."""
  b = MIN_BUCKET
  while b < n:
    b *= 2
  return min(b, max_len)


@functools.lru_cache(maxsize=None)
def make_score_step(apply_fn, mesh):
  """jit(shard_map(step)): (params, inputs, targets, weights) [B, T] -> (sum of target log
  probabilities where weights is 1 [B], whether each of those targets is the argmax [B]).

  Rows are independent, so each device returns its own rows (no collective)."""
  def score_step(params, inputs, targets, weights):
    logits = apply_fn(params, inputs).astype(jnp.float32)
    logprob = -eval_lib.token_nll(logits, targets)
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(logprob * weights, axis=-1), jnp.all(greedy, axis=-1)

  spec = P(parallel.AXIS)
  return jax.jit(parallel.shard_map(score_step, mesh, (P(), spec, spec, spec), (spec, spec)))


@functools.lru_cache(maxsize=None)
def make_next_token_step(apply_fn, mesh):
  """jit(shard_map(step)): (params, tokens [B, T], lengths [B]) -> the greedy next token [B]
  after each row's first lengths[b] tokens (causal attention: the padding after them is unseen)."""
  def next_token_step(params, tokens, lengths):
    logits = apply_fn(params, tokens)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(last.astype(jnp.float32), axis=-1).astype(jnp.int32)

  spec = P(parallel.AXIS)
  return jax.jit(parallel.shard_map(next_token_step, mesh, (P(), spec, spec), spec))


def _bar(total, desc, enabled):
  """evaluate.py's progress bar: on a terminal only, never in log files."""
  return eval_lib._progress(total, desc, enabled)  # pylint: disable=protected-access


class _Batches:
  """Rows of token lists grouped into fixed [batch, bucket] arrays, longest first."""

  def __init__(self, lengths, batch: int, max_len: int):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    self.chunks = []  # (row indices, padded length)
    for start in range(0, len(order), batch):
      idx = order[start:start + batch]
      self.chunks.append((idx, bucket(lengths[idx[0]], max_len)))

  def __len__(self):
    return len(self.chunks)


def flax_lm(params, model_cfg, tokenizer, mesh=None, batch_size=8, progress=True):
  """Our model as a harness `LM` (FlaxLM), or one line saying how to install the harness."""
  _harness()
  return FlaxLM(params, model_cfg, tokenizer, mesh, batch_size, progress)


class FlaxLM(TemplateLM):
  """Our GPT-2 (params already masked) as a harness model; see the module docstring."""

  def __init__(self, params, model_cfg, tokenizer, mesh=None, batch_size=8, progress=True):
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
    """[(logprob, is_greedy)] of (key, context_ids, continuation_ids) requests; the harness's
    left truncation to n_positions + 1 tokens, as HFLM does."""
    rows = []
    for _, context, continuation in requests:
      if not context or not continuation or len(continuation) > self.max_length:
        raise ValueError("a request needs a context and 1..n_positions continuation tokens")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], len(continuation)))
    return self._score(rows, "loglikelihood")

  def _score(self, rows, desc):
    step, mesh = make_score_step(self.apply_fn, self.mesh), self.mesh
    batches = _Batches([len(r[0]) for r in rows], self.batch, self.max_length)
    bar = _bar(len(batches), desc, self.progress)
    pending = []
    for idx, length in batches.chunks:
      inputs = np.zeros((self.batch, length), np.int32)
      targets = np.zeros((self.batch, length), np.int32)
      weights = np.zeros((self.batch, length), np.float32)
      for r, i in enumerate(idx):
        x, y, n = rows[i]
        inputs[r, :len(x)], targets[r, :len(y)] = x, y
        weights[r, len(x) - n:len(x)] = 1.0
      pending.append((idx, step(self.params, *parallel.shard_batch(
          (inputs, targets, weights), mesh))))
      bar.update(1)
    out = [None] * len(rows)
    for idx, result in pending:
      logprob, greedy = jax.device_get(result)
      for r, i in enumerate(idx):
        out[i] = (float(logprob[r]), bool(greedy[r]))
    bar.close()
    return out

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
    batches = _Batches([len(c) + n for c, _, n in jobs], self.batch, self.max_length)
    bar = _bar(len(batches), "generate", self.progress)
    out = [None] * len(jobs)
    for idx, length in batches.chunks:
      for i, new in zip(idx, self._generate([jobs[i] for i in idx], length)):
        out[i] = hf_utils.postprocess_generated_text(self.tok_decode(new), jobs[i][1], None)
      bar.update(1)
    bar.close()
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


# ----------------------------------------------------------------------------------------------
# The pipeline's entry point
# ----------------------------------------------------------------------------------------------


def task_names(config) -> list[str]:
  """eval.tasks, also accepting the flag form --config.eval.tasks=piqa,hellaswag."""
  return split_names(config.eval.tasks)


def split_names(items) -> list[str]:
  """('a,b', 'c') -> ['a', 'b', 'c']: a tuple key given in the flag form or element by element."""
  return [t.strip() for item in items for t in item.split(",") if t.strip()]


@functools.lru_cache(maxsize=None)
def task_manager(task_dir: str = ""):
  """The harness's TaskManager (it indexes ~15k task YAMLs: seconds, so once per process), with
  eval.task_dir's YAMLs added."""
  _harness()
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  if task_dir and not os.path.isdir(os.path.expanduser(task_dir)):
    raise UserError(f"eval.task_dir={task_dir!r} is not a directory: give the directory that "
                    "holds your task YAML files, or '' for the harness's own tasks")
  return TaskManager(include_path=os.path.expanduser(task_dir) if task_dir else None)


def check_task_names(config) -> None:
  """Every name of eval.tasks is a task, group or tag the harness knows (one line naming the
  first unknown one and its nearest matches)."""
  manager = task_manager(config.eval.task_dir)
  known = set(manager.all_tasks)
  for name in task_names(config):
    if name not in known:
      near = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
      raise UserError(f"eval.tasks: unknown task {name!r}"
                      + (f"; did you mean {', '.join(near)}?" if near else "")
                      + (f" (tasks from eval.task_dir={config.eval.task_dir!r} included)"
                         if config.eval.task_dir else
                         " (local tasks: set eval.task_dir to their YAML directory)"))


def load_tasks(config) -> list:
  """The Task / Group objects of eval.tasks with their datasets loaded, once per process (a
  sweep's runs share them): the pipeline asks for them before training, so a dataset that cannot
  be read fails then, not after hours of fine-tuning."""
  if not task_names(config):
    return []
  check_task_names(config)
  return list(_load_cached(tuple(task_names(config)), config.eval.task_dir))


@functools.lru_cache(maxsize=None)
def _load_cached(names, task_dir) -> tuple:
  return tuple(_load(names, task_manager(task_dir)))


def _load(names, manager) -> list:
  """The harness's Task / Group objects of `names`, with its dataset loaded; a dataset that
  cannot be read (an unreachable hub above all) is one line naming the task."""
  objects = []
  for name in names:
    try:
      loaded = manager.load(name)
    except (ConnectionError, OSError) as e:  # datasets / huggingface_hub raise these offline
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise UserError(f"eval.tasks: task {name!r} could not load its dataset ({first}): hub "
                      "datasets need network access once (the datasets cache then serves them "
                      "offline); local tasks read the files their YAML names") from None
    if name in loaded["groups"]:
      objects.append(loaded["groups"][name])
    else:  # a task, or a tag: its tasks
      objects.extend(loaded["tasks"].values())
  return objects


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
  """One task's harness results ({'acc,none': 0.5, 'acc_stderr,none': 0.1, 'alias': ...}) as
  {'acc': 0.5, 'acc_stderr': 0.1}; a stderr the harness has none for ('N/A') is None."""
  out = {}
  for key, value in entry.items():
    if "," not in key:
      continue  # alias, sample counts
    metric, filt = key.split(",", 1)
    name = metric if filt == "none" else key
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    out[name] = float(value) if number else None
  return out


def score_tasks(config, params, model_cfg, tokenizer, mesh, log, label="") -> dict:
  """{task: {metric: value, metric_stderr: value}} of eval.tasks for this model (params with
  any masks applied), logged as one 'tasks' event; `label` names the stage ('one-shot')."""
  lm_eval = _harness()
  loaded = load_tasks(config)
  lm = flax_lm(params, model_cfg, tokenizer, mesh, config.eval.batch_size)
  with compile_stats.counting() as compiled, _serial_bootstrap():
    out = lm_eval.simple_evaluate(
        model=lm, tasks=loaded, num_fewshot=config.eval.num_fewshot,
        limit=config.eval.task_limit or None, task_manager=task_manager(config.eval.task_dir),
        log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
  scores = {task: metrics_of(entry) for task, entry in out["results"].items()}
  shown = "; ".join(f"{t} " + ", ".join(f"{m} {v:.4f}" for m, v in s.items()
                                        if v is not None and not m.endswith("_stderr"))
                    for t, s in scores.items())
  log.event("tasks", f"{label + ' ' if label else ''}tasks: {shown} ({compiled['compilations']} "
            "compilation(s))", label=label or "final", tasks=scores,
            compilations=compiled["compilations"])
  return scores


def score_run(prep, params, oneshot: bool) -> dict:
  """results.json's `tasks` of the final params and, for a run scored before fine-tuning too,
  `oneshot_tasks` of its pruned params (prep.params); {} when eval.tasks is empty."""
  if not task_names(prep.config):
    return {}
  mesh, out = parallel.data_mesh(), {}
  if oneshot:
    out["oneshot_tasks"] = score_tasks(prep.config, prep.params, prep.model_cfg, prep.tok, mesh,
                                       prep.log, label="one-shot")
  out["tasks"] = score_tasks(prep.config, params, prep.model_cfg, prep.tok, mesh, prep.log)
  return out


def summary_lines(results: dict) -> list[str]:
  """A run's console table lines of its task scores: 'piqa  acc 0.6230 (one-shot 0.5810)'."""
  lines, oneshot = [], results.get("oneshot_tasks") or {}
  for task, metrics in (results.get("tasks") or {}).items():
    cells = [f"{m} {v:.4f}" + (f" (one-shot {oneshot[task][m]:.4f})"
                               if oneshot.get(task, {}).get(m) is not None else "")
             for m, v in metrics.items() if v is not None and not m.endswith("_stderr")]
    lines.append(f"{task:<24}" + "  ".join(cells))
  return lines
