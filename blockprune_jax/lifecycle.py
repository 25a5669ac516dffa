"""One run's phases after its config check: prepare (tokenizer, data, model, pruning plan,
one-shot pruning) -> fine_tune (one-shot evaluation, train.fit, late pruning, evaluation) ->
finish (results.json, Hugging Face export). pipeline.run calls them in this order."""
import dataclasses
import json
import math
import os
import time

import jax
import ml_collections
import numpy as np

from blockprune_jax import checkpoint as ckpt_lib
from blockprune_jax import compile_stats
from blockprune_jax import data as data_lib
from blockprune_jax import evaluate as eval_lib
from blockprune_jax import files
from blockprune_jax import hf_io
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax import tasks as tasks_lib
from blockprune_jax import tokenizer as tok_lib
from blockprune_jax import train
from blockprune_jax import validate as validate_lib
from blockprune_jax.errors import UserError
from blockprune_jax.logs import RunLog
from blockprune_jax.prune import allocation
from blockprune_jax.prune import plan as plan_lib
from blockprune_jax.prune import pruning


@dataclasses.dataclass
class Prepared:
  """One run with its model loaded and (for one-shot pruning) pruned."""
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
  late: bool  # prune.when=after_finetune: pruned after fine-tuning
  prune_s: float  # what pruning itself took (calibration, allocation, masks, SparseGPT)
  n_params: int
  compiled_before: dict  # compile_stats.snapshot() once the base was done


def prepare(config, workdir, log, t_start) -> Prepared:
  """Tokenizer, data, model, pruning plan and one-shot pruning of a run (its base trained)."""
  compiled_before = compile_stats.snapshot()  # this run's own compilations, not the base's
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

  late = (config.prune.method != "none" and config.prune.schedule == "oneshot"
          and config.prune.when == "after_finetune")
  t_prune = time.time()
  plan = (plan_lib.none(config, model_cfg) if late
          else plan_lib.compute(config, model_cfg, params, streams, log,
                                stored=checkpointed_allocation(config, workdir)))
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


def checkpointed_allocation(config, workdir):
  """The measured allocation in the newest checkpoint: a resumed run does not measure again."""
  if config.prune.allocation not in allocation.MEASURED:
    return None
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  with ckpt_lib.Checkpointer(directory) as ckpt:
    return (ckpt.latest_meta() or {}).get("allocation")


def wants_oneshot(prep: Prepared) -> bool:
  """eval.oneshot: whether the run evaluates right after pruning, before fine-tuning."""
  c = prep.config
  return (prep.plan.active and c.prune.schedule == "oneshot" and not prep.late
          and prep.steps > 0 and c.eval.oneshot)


NO_TRAINING = {"steps": 0, "tokens": 0, "final_loss": None, "tokens_per_s": None}


def fine_tune(prep: Prepared) -> tuple:
  """One-shot evaluation, fine-tuning, late pruning, evaluation: finish's (params, train
  summary, evals, one-shot evals or None, compacted MLP widths or None)."""
  config = prep.config
  mesh = parallel.train_mesh(config.mesh.fsdp)  # 'data', plus 'fsdp' where mesh.fsdp != 1
  splits = eval_splits(config)
  # What fine-tuning recovers: the first split's perplexity right after pruning.
  oneshot = (evaluate_splits(prep, prep.params, mesh, splits[:1], label="one-shot")
             if wants_oneshot(prep) else None)
  params, masks, summary = prep.params, prep.masks, dict(NO_TRAINING)
  if prep.steps > 0:
    params, masks, summary = train.fit(config, prep.model_cfg, prep.params, prep.masks,
                                       prep.plan, prep.streams, prep.workdir, prep.log,
                                       total=prep.steps, mesh=mesh)
  if prep.late:  # prune.when=after_finetune: a plan of the fine-tuned weights
    t_prune = time.time()
    prep.plan = plan_lib.compute(config, prep.model_cfg, jax.device_get(params), prep.streams,
                                 prep.log)
    params, masks = prep.plan.prune(params, prep.plan.ratios_per_layer)
    prep.prune_s = time.time() - t_prune
  compacts = (prep.plan.active and pruning.criterion(config.prune.method).compactable
              and config.prune.compact)
  if not compacts:
    return params, summary, evaluate_splits(prep, params, mesh, splits), oneshot, None
  # Structured pruning really shrinks the model: it is evaluated compacted. Results and the
  # export describe the masked dense parameters (the same outputs).
  eval_params, widths = pruning.compact_mlp(jax.device_get(params), masks)
  apply_fn = model_lib.logits_fn(pruning.compacted_config(prep.model_cfg, widths))
  prep.log.event("compact", f"evaluating with MLP widths {list(widths)}", widths=list(widths))
  evals = evaluate_splits(prep, eval_params, mesh, splits, apply_fn=apply_fn)
  return params, summary, evals, oneshot, widths


def evaluate_splits(prep: Prepared, params, mesh, splits, *, label="", apply_fn=None):
  """{split: evaluate.evaluate(...) result}, each logged."""
  apply_fn = apply_fn or model_lib.logits_fn(prep.model_cfg)
  step = eval_lib.make_eval_step(apply_fn, mesh)
  out = {}
  for split in splits:
    out[split] = eval_lib.evaluate(apply_fn, params, prep.streams.get(split), mesh=mesh,
                                   desc=split, step_fn=step, **eval_args(prep.config))
    log_eval(prep.log, split, out[split], label)
  return out


def eval_args(config) -> dict:
  return {"seq_len": config.data.seq_len, "stride": config.eval.stride or config.data.seq_len,
          "batch_size": config.eval.batch_size}


def log_eval(log, split, r, label, beside=""):
  log.event("eval", f"{label + ' ' if label else ''}{split}: perplexity {r['perplexity']:.3f} "
            f"over {r['tokens_scored']} tokens ({beside}{r['tokens_per_s']:,.0f} tokens/s)",
            split=split, label=label or "final", **r)


def eval_splits(config):
  """eval.splits, also accepting the flag form --config.eval.splits=validation,test."""
  return [s.strip() for item in config.eval.splits for s in item.split(",") if s.strip()]


def finish(prep: Prepared, params, train_summary, evals, oneshot, compact_widths=None, *,
           seconds=None, compiled=None, batch=None) -> dict:
  """Writes results.json (and the Hugging Face export) of a run; returns the results dict.
  seconds / compiled: the run's (default: since it started), or its share of a group's (batch)."""
  config, log = prep.config, prep.log
  results_path = os.path.join(prep.workdir, files.RESULTS)
  scored = tasks_lib.score_run(prep, params, oneshot=wants_oneshot(prep))
  dev = jax.devices()[0]
  compiled = compiled or compile_stats.since(prep.compiled_before)
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
                  "compile_s": round(compiled["compile_s"], 3),
                  "compilations": compiled["compilations"],
                  "compile_cache_hits": compiled["cache_hits"], "compiled": compiled["by_name"]},
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


def load_model(config, ckpt_dir, vocab_size):
  """(GPT2Config, params): ckpt_dir's checkpoint, or a random model.* (model.init=scratch)."""
  m = config.model
  overrides = dict(dtype=m.dtype, dropout=m.dropout, attention=m.attention,
                   scan_layers=m.scan_layers)
  if ckpt_dir:
    model_cfg, params = _checkpoint(ckpt_dir, overrides)
    if vocab_size > model_cfg.vocab_size:
      raise UserError(f"the tokenizer has {vocab_size} tokens, the model at {ckpt_dir} only "
                      f"{model_cfg.vocab_size}: check data.tokenizer")
    return model_cfg, params
  model_cfg = model_lib.GPT2Config(vocab_size=vocab_size, n_layer=m.n_layer, n_embd=m.n_embd,
                                   n_head=m.n_head, n_positions=m.n_positions, **overrides)
  return model_cfg, model_lib.init_params(model_cfg, config.seed)


_CHECKPOINTS = {}  # (files.dir_stamp, overrides) -> (GPT2Config, params)


def _checkpoint(ckpt_dir, overrides):
  """hf_io.load_config + load_params, read once while the files stay the same (a sweep's runs
  start from one base). The last one is kept, read-only: no run changes another's."""
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
