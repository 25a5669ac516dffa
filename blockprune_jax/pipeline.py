"""One experiment, top to bottom: config -> data -> model -> pruning -> fine-tuning -> evaluation
-> results.json (-> Hugging Face export).

`run(config, workdir)` is what `python -m blockprune_jax.main` calls and what tests call. It is
idempotent: a finished workdir (results.json present) is only reported; an interrupted one resumes
from its latest checkpoint. It is `run_group` of one run: a sweep's runs that can share a program
(batched.py) go through the same lifecycle K at a time, each phase one program for all of them.
"""
import contextlib
import dataclasses
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np

from blockprune_jax.prune import allocation
from blockprune_jax import batched
from blockprune_jax import checkpoint as ckpt_lib
from blockprune_jax import compile_stats
from blockprune_jax import config_lib
from blockprune_jax import data as data_lib
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import files
from blockprune_jax import hf_io
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax.prune import plan as plan_lib
from blockprune_jax.prune import pruning
from blockprune_jax import tasks as tasks_lib
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax import train
from blockprune_jax import validate as validate_lib
from blockprune_jax.errors import NoSpace
from blockprune_jax.errors import Preempted
from blockprune_jax.errors import UserError
from blockprune_jax.logs import RunLog

def run(config: ml_collections.ConfigDict, workdir: str, echo: bool = True,
        summary: bool | None = None) -> dict:
  """Runs (or resumes, or just reports) one experiment; returns the results dict.

  A group of one (run_group): whatever ended the run is raised. echo: print the run's progress
  lines; summary (default: echo): print its table at the end. A sweep turns both off and prints
  one line per run; log.jsonl and metrics.jsonl hold everything either way.
  """
  summary = echo if summary is None else summary
  [results] = run_group([config], [workdir], echo=echo)
  if isinstance(results, BaseException):
    raise results
  if summary:
    print(summary_table(results))
  return results


def run_group(configs, workdirs, echo: bool = False) -> list:
  """Runs `configs`, each in its workdir, side by side as one program (batched.py; one config:
  the one-run program); returns per run its results dict or the exception that ended it (a
  failed run does not stop the others).

  A run whose results.json exists is only read. Ctrl-C / SIGTERM (Preempted, KeyboardInterrupt)
  propagate: every run then has a checkpoint at the step reached, and the same call resumes.
  """
  paths = [os.path.join(w, "results.json") for w in workdirs]
  outcomes = [finished(p, echo=False) for p in paths]
  for config, outcome in zip(configs, outcomes):
    if outcome is None:
      validate(config)  # a finished run is not validated again
  if all(o is not None for o in outcomes):
    return outcomes
  parallel.maybe_initialize_distributed()
  with contextlib.ExitStack() as stack:
    todo = []
    for k, workdir in enumerate(workdirs):
      if outcomes[k] is None:
        stack.enter_context(parallel.workdir_lock(workdir))  # a second process is refused
        files.check_workdir_layout(workdir)
        outcomes[k] = finished(paths[k], echo=False)  # the lock's holder may just have finished
        todo += [k] if outcomes[k] is None else []
    if todo:
      compile_stats.enable_persistent_cache(
          configs[0].runtime.compile_cache
          or os.path.join(data_lib.cache_root(configs[0].data), "jax_compile"))
      compile_stats.install()
      logs = {k: stack.enter_context(_Closing(RunLog(workdirs[k], config=configs[k], echo=echo)))
              for k in todo}
      preps, own = [], {}
      for k in todo:  # preparing (base model, pruning, measured allocations) goes run by run
        t0 = time.time()
        prep = _attempt([logs[k]], prepare, configs[k], workdirs[k], logs[k].log, t0)
        if isinstance(prep, Exception):
          outcomes[k] = prep
          continue
        preps.append((k, prep))
        own[k] = (time.time() - t0, compile_stats.since(prep.compiled_before))
      for group in _by_shape(preps):
        _complete_group(group, outcomes, logs, own)
  return outcomes


def finished(results_path, echo=True):
  """A finished run's results (its table printed), else None. An unreadable results.json is
  moved aside with a warning and the run goes again (files.read_results)."""
  # Before jax.distributed starts, asking jax for the process index would start a backend.
  primary = not jax.distributed.is_initialized() or jax.process_index() == 0
  results = files.read_results(results_path, primary=primary)
  if results is not None and echo:
    print(summary_table(results))
  return results


class _Closing:
  """A run's RunLog in a group: it closes as failed when its run failed, though the group's
  block went on."""

  def __init__(self, log):
    self.log, self.failed = log, False

  def __enter__(self):
    self.log.__enter__()
    return self

  def __exit__(self, exc_type, exc, tb):
    self.log.close(exit_code=1 if exc_type is not None or self.failed else 0)


def _attempt(logs, fn, *args, **kwargs):
  """fn(*args, **kwargs), or the exception that ended it (then the runs of `logs`, _Closing
  each, close as failed). Preemption (SIGTERM, Ctrl-C) is no failure, and a full disk would fail
  every run alike: both propagate."""
  try:
    return fn(*args, **kwargs)
  except (Preempted, NoSpace):
    raise
  except Exception as e:  # pylint: disable=broad-except
    for log in logs:
      log.failed = True
    return e


def _by_shape(preps) -> list:
  """The prepared (index, run) pairs as groups of one program: those of the first run's model
  shape and step count together, and each other one alone (its config agreed with the group's,
  the checkpoint it loads did not)."""
  if not preps:
    return []
  first = preps[0][1]
  same = [(k, p) for k, p in preps if (p.model_cfg, p.steps) == (first.model_cfg, first.steps)]
  alone = [(k, p) for k, p in preps if (p.model_cfg, p.steps) != (first.model_cfg, first.steps)]
  for _, prep in alone:
    why = "its model shape or step count differs from the group's first run: training alone"
    prep.log.event("batch", why, alone=why)
  return [[x] for x in alone] + [same]


def _complete_group(group, outcomes, logs, own):
  """The shared phases of a group's prepared runs (one, or K side by side), then each run's
  results; in a group of K, a run's times are its own preparation plus its share of the group's
  (batched.py)."""
  ks, preps = [k for k, _ in group], [p for _, p in group]
  t_shared, before = time.time(), compile_stats.snapshot()
  done = _attempt([logs[k] for k in ks], complete, preps)
  shared_s, shared_compiled = time.time() - t_shared, compile_stats.since(before)
  n, names = len(preps), [os.path.basename(p.workdir) for p in preps]
  for i, (k, prep) in enumerate(group):
    outcome = done if isinstance(done, Exception) else done[i]
    if isinstance(outcome, Exception):
      logs[k].failed, outcomes[k] = True, outcome
      continue
    shares = {}
    if n > 1:  # its own preparation plus its share of the group's time
      own_s, own_compiled = own[k]
      shares = {"seconds": own_s + shared_s / n,
                # The group's compilations are counted once, in its first run.
                "compiled": (compile_stats.add(own_compiled, shared_compiled) if i == 0
                             else own_compiled),
                "batch": {"runs": n, "index": i, "names": names,
                          "mode": batched.mode(prep.config), "seconds": round(shared_s, 3)}}
    params, train_summary, evals, oneshot, widths = outcome
    outcomes[k] = _attempt([logs[k]], finish, prep, params, train_summary, evals, oneshot,
                           compact_widths=widths, **shares)


def complete(preps: list) -> list:
  """The phases after `prepare` of K >= 1 prepared runs of one model shape and step count, as
  one program: one-shot evaluation, fine-tuning, (late pruning), evaluation. Per run (params,
  train summary, evals, one-shot evals or None, compacted MLP widths or None), or the error
  that ended its training."""
  # 'data', plus 'fsdp' where the state is sharded (mesh.fsdp != 1)
  mesh = parallel.train_mesh(preps[0].config.mesh.fsdp)
  apply_fn = model_lib.logits_fn(preps[0].model_cfg)
  splits = eval_splits(preps[0].config)
  oneshot = [None] * len(preps)
  # What fine-tuning recovers: the first split's perplexity right after pruning (one split:
  # the comparisons use the first one).
  wants = [i for i, p in enumerate(preps) if wants_oneshot(p)]
  for i, evals in zip(wants, evaluate_runs([preps[i] for i in wants],
                                           [preps[i].params for i in wants], apply_fn, mesh,
                                           splits=splits[:1], label="one-shot")):
    oneshot[i] = evals
  trained = [(p.params, p.masks, dict(NO_TRAINING)) for p in preps]
  if preps[0].steps > 0:
    trained = train.fit(preps, total=preps[0].steps, mesh=mesh)
  out = list(trained)
  together = []  # evaluated as one program; a compacted model is evaluated alone
  for i in [i for i, t in enumerate(trained) if not isinstance(t, Exception)]:
    params, masks, summary = trained[i]
    if preps[i].late:
      params, masks = prune_late(preps[i], params)
    evals, widths = None, None
    if compacts(preps[i]):
      evals, widths = evaluate_compacted(preps[i], params, masks, mesh)
    else:
      together.append(i)
    out[i] = [params, summary, evals, oneshot[i], widths]
  for i, evals in zip(together, evaluate_runs([preps[i] for i in together],
                                              [out[i][0] for i in together], apply_fn, mesh,
                                              splits=splits)):
    out[i][2] = evals
  return out


NO_TRAINING = {"steps": 0, "tokens": 0, "final_loss": None, "tokens_per_s": None}


@dataclasses.dataclass
class Prepared:
  """One run with its model loaded and (for one-shot pruning) pruned: what training and
  evaluation start from. run_group prepares the runs of a group one by one."""
  config: ml_collections.ConfigDict  # with a trained base resolved to model.name_or_path
  workdir: str
  log: RunLog
  t_start: float
  tok: object
  streams: "Streams"
  model_cfg: model_lib.GPT2Config
  params: dict
  masks: dict  # {} = dense
  plan: plan_lib.Plan  # a no-op Plan for prune.method=none (and until late pruning)
  steps: int  # fine-tuning steps
  late: bool  # prune.when=after_finetune: pruned after fine-tuning (prune_late)
  prune_s: float  # what pruning itself took (calibration, allocation, masks, SparseGPT)
  n_params: int
  compiled_before: dict  # compile_stats.snapshot() once the base was done


def prepare(config, workdir, log, t_start) -> Prepared:
  """The first phases of a run: base model, tokenizer, data, model, pruning plan, one-shot
  pruning."""
  tasks_lib.load_tasks(config)  # eval.tasks' datasets: one that cannot load fails before training
  dev = jax.devices()[0]
  log.event("start", f"{workdir}: {jax.device_count()} x {dev.device_kind} ({jax.default_backend()}), "
            f"{jax.process_count()} process(es)", config=config.to_dict(),
            devices=[str(d) for d in jax.devices()])

  # --- base model (offline studies train one from scratch, once) ---------------------
  if config.base.steps > 0 and config.model.init == "scratch":
    base_dir = config.base.dir or os.path.join(workdir, "base")
    base = base_config(config)
    check_base(base, base_dir)
    if not os.path.isfile(os.path.join(base_dir, "results.json")):
      log.event("base", f"training the dense base model once ({base.train.steps} steps) in "
                f"{base_dir}", base_dir=base_dir)
    run(base, base_dir, summary=False)  # its training progress shows, not its table
    parallel.sync("base model exported")
    config = config_lib.apply_overrides(config, {
        "model.init": "pretrained", "model.name_or_path": os.path.join(base_dir, "export")})
  compiled_before = compile_stats.snapshot()  # this run's own compilations, not the base's

  # --- tokenizer, data and model ------------------------------------------------------
  ckpt_dir = hf_io.resolve_dir(config.model.name_or_path) if config.model.init == "pretrained" else None
  tok = tok_lib.load_tokenizer(ckpt_dir or "", config.data.tokenizer)
  streams = Streams(config, tok)
  model_cfg, params = load_model(config, ckpt_dir, vocab_size=len(tok))
  if config.data.seq_len > model_cfg.n_positions:
    raise UserError(f"data.seq_len={config.data.seq_len} exceeds the model's n_positions="
                    f"{model_cfg.n_positions}: lower --config.data.seq_len")
  n_params = model_lib.count_params(params)
  log.event("model", f"GPT-2 {model_cfg.n_layer} layers x {model_cfg.n_embd} wide, "
            f"{n_params / 1e6:.2f}M parameters, compute {model_cfg.dtype}",
            model=dataclasses.asdict(model_cfg), params=n_params)

  # --- pruning plan and one-shot pruning -----------------------------------------------
  late = (config.prune.method != "none" and config.prune.schedule == "oneshot"
          and config.prune.when == "after_finetune")
  t_prune = time.time()
  plan = (plan_lib.none(config, model_cfg) if late
          else plan_lib.compute(config, model_cfg, params, streams, log,
                                stored=allocation_in_checkpoint(config, workdir)))
  masks = {}
  steps = train_steps(config, streams)
  if plan.gradual and steps == 0:
    raise UserError("prune.schedule=gradual prunes during fine-tuning: set train.steps or "
                    "train.epochs, or use prune.schedule=oneshot")
  oneshot = plan.active and not plan.gradual  # a late run's plan is the no-op one until then
  if oneshot:
    params, masks = plan.prune(params, plan.ratios_per_layer)
    jax.block_until_ready(params)
  prune_s = time.time() - t_prune if plan.active else 0.0
  if oneshot:
    log.event("pruned", f"pruned in {prune_s:.1f} s", seconds=prune_s)
  return Prepared(config=config, workdir=workdir, log=log, t_start=t_start, tok=tok,
                  streams=streams, model_cfg=model_cfg, params=params, masks=masks, plan=plan,
                  steps=steps, late=late, prune_s=prune_s, n_params=n_params,
                  compiled_before=compiled_before)


def allocation_in_checkpoint(config, workdir):
  """The measured allocation saved with the run's newest checkpoint, if it has one (a resumed
  run prunes with it instead of measuring again; its masks come back with the state)."""
  if config.prune.allocation not in allocation.MEASURED:
    return None
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  with ckpt_lib.Checkpointer(directory) as ckpt:
    return (ckpt.latest_meta() or {}).get("allocation")


def wants_oneshot(prep: Prepared) -> bool:
  """Whether the run evaluates right after pruning, before fine-tuning (eval.oneshot)."""
  c = prep.config
  return (prep.plan.active and c.prune.schedule == "oneshot" and not prep.late
          and prep.steps > 0 and c.eval.oneshot)


def finish(prep: Prepared, params, train_summary, evals, oneshot, *, compact_widths=None,
           seconds=None, compiled=None, batch=None) -> dict:
  """results.json (and the Hugging Face export) of a run; returns the results dict.

  seconds / compiled: the run's wall time and compilations (default: since it started); a
  batched run passes its share of the group's time and `batch` (runtime.batch) says so.
  """
  config, log = prep.config, prep.log
  results_path = os.path.join(prep.workdir, "results.json")
  # Zero-shot tasks (eval.tasks), like perplexity: final and, for one-shot pruned runs, before
  # fine-tuning (prep.params are the pruned weights); scored here so batched runs get them too.
  scored = tasks_lib.score_run(prep, params, oneshot=wants_oneshot(prep))
  dev = jax.devices()[0]
  results = {
      "role": config.role,
      "config": config.to_dict(),
      "model": {"n_layer": prep.model_cfg.n_layer, "n_embd": prep.model_cfg.n_embd,
                "n_head": prep.model_cfg.n_head, "params_total": prep.n_params,
                "params_nonzero": int(sum(int(np.count_nonzero(np.asarray(x)))
                                          for x in jax.tree.leaves(params)))},
      "perplexity": {s: r["perplexity"] for s, r in evals.items()},
      "eval": evals,
      "pruning": dict(prep.plan.describe(), compacted_mlp_widths=compact_widths,
                      seconds=round(prep.prune_s, 3)),
      "sparsity": plan_lib.measure(params, prep.model_cfg, prep.plan),
      "train": train_summary,
      "runtime": {"backend": jax.default_backend(), "devices": jax.device_count(),
                  "processes": jax.process_count(), "device_kind": dev.device_kind,
                  "seconds": time.time() - prep.t_start if seconds is None else seconds,
                  **_compile_summary(compiled or compile_stats.since(prep.compiled_before))},
  }
  results.update(scored)
  if batch is not None:
    results["runtime"]["batch"] = batch
  if oneshot is not None:
    results["oneshot"] = {"perplexity": {k: r["perplexity"] for k, r in oneshot.items()},
                          "eval": oneshot}
  if config.export.hf:
    out = os.path.join(prep.workdir, "export")
    if jax.process_index() == 0:
      hf_io.export(jax.device_get(params), prep.model_cfg, out, prep.tok)
      log.event("export", f"exported Hugging Face model to {out}")
    results["export"] = out
  results = json.loads(json.dumps(results, default=files.to_jsonable))  # what callers get == the file
  if jax.process_index() == 0:
    files.write_json(results_path, results)
  parallel.sync("results written")
  log.event("done", f"results in {results_path}")
  log.finish(results)
  return results


# --- pieces ------------------------------------------------------------------------------

def validate(config):
  """Fails early, in one line naming the key, on values that no code path accepts
  (validate.py: every key's type, range or choice, then combinations)."""
  validate_lib.validate(config)


def evaluate_splits(config, apply_fn, params, streams, mesh, eval_step, log, label="",
                    splits=None, runs=None):
  """{split: evaluate.evaluate(...) result} for `splits` (default: every split of eval.splits).

  runs=K: `params` are K runs stacked (eval_step batched), `log` is their K logs, and the result
  is K such dicts, each run's times its share of the program's (batched.py)."""
  out = [{} for _ in range(runs or 1)]
  logs = log if runs else [log]
  for split in splits or eval_splits(config):
    results = eval_lib.evaluate(apply_fn, params, streams.get(split), seq_len=config.data.seq_len,
                                stride=config.eval.stride or config.data.seq_len,
                                batch_size=config.eval.batch_size, mesh=mesh, desc=split,
                                step_fn=eval_step, runs=runs)
    beside = f"side by side with {runs - 1} other run(s), " if runs else ""
    for evals, run_log, r in zip(out, logs, results if runs else [results]):
      if runs:
        r = dict(r, seconds=r["seconds"] / runs, first_batch_s=r["first_batch_s"] / runs)
      evals[split] = r
      run_log.event("eval", f"{label + ' ' if label else ''}{split}: perplexity "
                    f"{r['perplexity']:.3f} over {r['tokens_scored']} tokens ({beside}"
                    f"{r['tokens_per_s']:,.0f} tokens/s)", split=split, label=label or "final", **r)
  return out if runs else out[0]


def evaluate_runs(preps, params, apply_fn, mesh, *, splits, label=""):
  """[{split: evaluate() result}] of each run: one run's program, or K runs' as one (each
  result holding its share of the time)."""
  if len(preps) <= 1:
    return [evaluate_splits(p.config, apply_fn, x, p.streams, mesh,
                            eval_lib.make_eval_step(apply_fn, mesh), p.log, label=label,
                            splits=splits) for p, x in zip(preps, params)]
  config = preps[0].config
  step = eval_lib.make_eval_step(apply_fn, mesh, batched=batched.mode(config))
  return evaluate_splits(config, apply_fn, batched.stack(params), preps[0].streams, mesh, step,
                         [p.log for p in preps], label=label, splits=splits, runs=len(preps))


def prune_late(prep: Prepared, params):
  """prune.when=after_finetune, no recovery: the plan (scores, statistics) computed from the
  fine-tuned weights, then (params, masks) pruned by it."""
  t_prune = time.time()
  prep.plan = plan_lib.compute(prep.config, prep.model_cfg, jax.device_get(params),
                               prep.streams, prep.log)
  params, masks = prep.plan.prune(params, prep.plan.ratios_per_layer)
  prep.prune_s = time.time() - t_prune
  return params, masks


def compacts(prep: Prepared) -> bool:
  """Whether the run is evaluated as a smaller model (a compactable method, prune.compact)."""
  return (prep.plan.active and pruning.criterion(prep.config.prune.method).compactable
          and prep.config.prune.compact)


def evaluate_compacted(prep: Prepared, params, masks, mesh):
  """Structured pruning really shrinks the model: (evaluations of the compacted MLPs, their
  widths). The masked dense parameters, identical in output, are what results and the export
  describe."""
  eval_params, widths = pruning.compact_mlp(jax.device_get(params), masks)
  apply_fn = model_lib.logits_fn(pruning.compacted_config(prep.model_cfg, widths))
  prep.log.event("compact", f"evaluating with MLP widths {list(widths)}", widths=list(widths))
  evals = evaluate_splits(prep.config, apply_fn, eval_params, prep.streams, mesh,
                          eval_lib.make_eval_step(apply_fn, mesh), prep.log)
  return evals, widths


def _compile_summary(compiled: dict) -> dict:
  """results.json runtime fields: XLA compilations this run caused and the seconds they took."""
  return {"compile_s": round(compiled["compile_s"], 3), "compilations": compiled["compilations"],
          "compile_cache_hits": compiled["cache_hits"], "compiled": compiled["by_name"]}


def eval_splits(config):
  """eval.splits, also accepting the flag form --config.eval.splits=validation,test."""
  return [s.strip() for item in config.eval.splits for s in item.split(",") if s.strip()]


def load_model(config, ckpt_dir, vocab_size):
  """(GPT2Config, params): the checkpoint in ckpt_dir (model.init=pretrained), or a random
  model of the model.* shape with the tokenizer's vocabulary (model.init=scratch)."""
  m = config.model
  overrides = dict(dtype=m.dtype, dropout=m.dropout, attention=m.attention,
                   scan_layers=m.scan_layers)
  if ckpt_dir:
    model_cfg, params = _checkpoint(ckpt_dir, overrides)
    if vocab_size > model_cfg.vocab_size:
      raise UserError(f"the tokenizer has {vocab_size} tokens, the model at {ckpt_dir} only "
                      f"{model_cfg.vocab_size}: check data.tokenizer")
    return model_cfg, params
  if m.n_embd % m.n_head:
    raise UserError(f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}")
  model_cfg = model_lib.GPT2Config(vocab_size=vocab_size, n_layer=m.n_layer, n_embd=m.n_embd,
                                   n_head=m.n_head, n_positions=m.n_positions, **overrides)
  return model_cfg, model_lib.init_params(model_cfg, config.seed)


_CHECKPOINTS = {}  # files.dir_stamp + overrides -> (GPT2Config, params): the last one read


def _checkpoint(ckpt_dir, overrides):
  """hf_io.load_config + load_params, read once per process while the files stay the same: the
  runs of a sweep all start from one base model. One is kept (GPT-2 124M is 0.5 GB on the
  host), and its arrays are read-only, so no run can change the start of another."""
  key = (files.dir_stamp(ckpt_dir), tuple(sorted(overrides.items())))
  if key not in _CHECKPOINTS:
    _CHECKPOINTS.clear()
    model_cfg = hf_io.load_config(ckpt_dir, **overrides)
    params = hf_io.load_params(ckpt_dir, model_cfg)
    for x in jax.tree.leaves(params):
      x.setflags(write=False)
    _CHECKPOINTS[key] = (model_cfg, params)
  return _CHECKPOINTS[key]


class Streams:
  """Token streams of the splits, tokenized (or read from the cache) on first use."""

  def __init__(self, config, tok):
    self.config, self.tok, self._cache = config, tok, {}

  def get(self, split: str) -> np.ndarray:
    if split not in self._cache:
      s = data_lib.token_stream(self.config.data, split, self.tok)
      if self.config.eval.max_tokens and split != "train":
        s = s[:self.config.eval.max_tokens]
      self._cache[split] = s
    return self._cache[split]


def train_steps(config, streams) -> int:
  """train.steps if > 0, else epochs over the train split's sequences, else 0."""
  t = config.train
  if t.steps > 0:
    return int(t.steps)
  if t.epochs <= 0:
    return 0
  n_seq = (len(streams.get("train")) - 1) // config.data.seq_len
  per_step = t.batch_size * t.grad_accum
  if n_seq < per_step:
    raise UserError(f"the train split has {n_seq} sequences of data.seq_len={config.data.seq_len}, "
                    f"fewer than one step needs ({per_step}); lower train.batch_size")
  steps = max(1, int(math.ceil(t.epochs * (n_seq // per_step))))
  if steps > validate_lib.INT_MAX:
    raise UserError(f"train.epochs={t.epochs} means {steps} steps, more than the step counter "
                    f"holds ({validate_lib.INT_MAX}): lower train.epochs")
  return steps


def base_config(config):
  """The config of the dense base model a from-scratch study prunes (trained once).

  Its seed is base.seed, so runs that differ only in seed share one base."""
  b = config.base
  return config_lib.apply_overrides(config, {
      "base.steps": 0, "role": "base", "prune.method": "none", "distill.teacher": "",
      "seed": b.seed,
      "train.steps": b.steps, "train.epochs": 0.0, "train.learning_rate": b.learning_rate,
      "train.batch_size": b.batch_size or config.train.batch_size,
      "train.warmup_steps": max(1, b.steps // 20), "eval.splits": ("validation",),
      "eval.tasks": (), "export.hf": True})  # the dense control's tasks are the reference


def check_base(base, base_dir):
  """A finished base in base_dir must have been trained the way this run would train it."""
  path = os.path.join(base_dir, "results.json")
  if not files.readable_json(path):
    return  # none yet, or unreadable: run(base) trains (or resumes) it again
  saved = files.load_json(path).get("config") or {}
  try:
    train.check_resumable(train.resume_keys(saved), train.resume_keys(base), base_dir)
  except UserError as e:
    raise UserError(f"base.dir: {e}; the base model is shared by every run that names this "
                    "directory") from None


def summary_table(results) -> str:
  """A short human-readable table of a results dict."""
  lines = []
  pr = results.get("pruning", {})
  sp = results.get("sparsity", {})
  lines.append(f"method {pr.get('method', 'none')}  allocation {pr.get('allocation', '-')}  "
               f"ratios/block {_fmt_list(pr.get('ratios_per_block'))}")
  lines.append(f"sparsity overall {sp.get('overall', 0):.4f}  per block "
               f"{_fmt_list(sp.get('per_block'))}")
  lines.append(f"{'split':<12}{'perplexity':>12}{'tokens':>10}{'tokens/s':>12}")
  for split, r in results.get("eval", {}).items():
    lines.append(f"{split:<12}{r['perplexity']:>12.3f}{r['tokens_scored']:>10d}"
                 f"{r['tokens_per_s']:>12,.0f}")
  lines += tasks_lib.summary_lines(results)
  return "\n".join(lines)


def _fmt_list(xs):
  return "-" if not xs else "[" + ", ".join(f"{x:.3f}" for x in xs) + "]"
