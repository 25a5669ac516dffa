"""Shared defaults for every blockprune_jax experiment, and the one declaration of every key.

Every other config starts from `get_config()` here and changes a few keys.
Any key can be overridden on the command line, e.g.

    python -m blockprune_jax.main --config=configs/eval.py --workdir=runs/x \
        --config.model.name_or_path=gpt2-medium --config.eval.batch_size=4

Each key is one row: Key(default, rule, meaning, facts). The rule is what validate.py accepts
(blockprune_jax/rules.py), the meaning goes to docs/config.md (`python -m blockprune_jax.keys`),
and the facts tell the harness how to treat the key (rules.Key): resume=True, a resumed run may
change it; group=True, runs side by side may differ in it; legacy=, what older checkpoints ran
with; paired=True, the report's paired comparison lets runs differ in it.
"""
import importlib

from blockprune_jax.prune import allocation
from blockprune_jax.prune import pruning
from blockprune_jax import config_lib
from blockprune_jax import wandb_log
from blockprune_jax.rules import (COUNT, CURRENT, INT_MAX, POSITIVE, RATE, RATIO, WHEN, Bool,
                                  Choice, DeviceGroup, Float, Int, Key, Names, Numbers, Str,
                                  TokenCount)


def _registry(module, name):
  """blockprune_jax.<module>.<name>, read when a value is checked: importing the config should
  not load transformers (data) or the planner."""
  return lambda: getattr(importlib.import_module(f"blockprune_jax.{module}"), name)


KEYS = {
    "seed": Key(0, Int(0), "seeds init, data order, dropout, random pruning, calibration picks",
                group=True, paired=True),
    # control: sweep's dense controls; base: the dense base model (pipeline.base_config)
    "role": Key("experiment", Choice(("experiment", "base", "control")),
                '"base" for the dense base model a from-scratch study trains first',
                resume=True, group=True),

    # --- model -------------------------------------------------------------------------------
    "model.init": Key("pretrained", Choice(("pretrained", "scratch")),
                      "pretrained (hub id or local HF dir) | scratch (random init)"),
    "model.name_or_path": Key(
        "gpt2", Str(),
        "hub id, or a directory with config.json + model.safetensors/pytorch_model.bin"),
    "model.n_layer": Key(12, POSITIVE, "shape of a scratch model (a checkpoint brings its own)"),
    "model.n_embd": Key(768, POSITIVE, "width of a scratch model"),
    "model.n_head": Key(12, POSITIVE, "attention heads of a scratch model (must divide n_embd)"),
    "model.n_positions": Key(1024, Int(2),
                             "longest sequence a scratch model takes (>= data.seq_len)"),
    "model.dropout": Key(0.1, RATIO,
                         "embedding and residual dropout during training (GPT-2's 0.1)"),
    "model.dtype": Key("float32", Choice(("float32", "bfloat16")),
                       "compute dtype: float32 | bfloat16 (parameters stay float32)"),
    "model.attention": Key("auto", Choice(("auto", "cudnn", "xla")),
                           "auto (cuDNN on GPU when possible, else XLA) | cudnn | xla",
                           resume=True),
    # Same model, dropout draws differ (so a resume keeps it); evaluation stays unrolled
    # (docs/scale.md).
    "model.scan_layers": Key(False, Bool(), "train the blocks as one lax.scan: with mesh.fsdp, "
                             "one block's weights gathered at a time", legacy=False),

    # --- base model trained from scratch (offline studies) -------------------------------------
    # A group's runs share one base (pipeline.ensure_base), so they may each name it.
    "base.steps": Key(0, COUNT, "> 0 with model.init=scratch: first train a dense base for this "
                      "many steps, export it and prune/fine-tune that instead (a sweep trains it "
                      "once for all its runs)", group=True),
    "base.dir": Key("", Str(), 'where the base run lives; "" = <workdir>/base (a sweep sets '
                    "<sweep>/base)", resume=True, group=True),
    "base.learning_rate": Key(1e-3, RATE, "base training uses its own (higher) learning rate",
                              group=True),
    "base.batch_size": Key(0, COUNT, "0 = train.batch_size", group=True),
    "base.seed": Key(0, Int(0), "the base's own seed, so runs that differ only in seed share one "
                     "base", group=True),

    # --- data --------------------------------------------------------------------------------
    "data.source": Key("hf", Choice(_registry("data", "SOURCES")), "hf (datasets.load_dataset) | "
                       "text (local files) | builtin (offline corpus)"),
    "data.hf_path": Key("wikitext", Str(), "source=hf: the dataset's hub name"),
    "data.hf_name": Key("wikitext-2-raw-v1", Str(),
                        'source=hf: its configuration ("" for none)'),
    "data.text_dir": Key("", Str(), "for source=text: wiki.{train,valid,test}.{raw,tokens} or "
                         "{train,validation,test}.txt"),
    "data.seq_len": Key(1024, Int(2), "tokens per sequence"),
    "data.cache_dir": Key("", Str(), 'token stream cache; "" = ~/.cache/blockprune_jax (or '
                          "$BLOCKPRUNE_CACHE)", resume=True),
    "data.tokenizer": Key(
        "", Str(), '"" = the checkpoint\'s own (a hub id: the local cache, then the hub; the '
        'offline GPT-2 BPE if neither has it); "gpt2-offline"; "bytes" (257 tokens, fast CPU '
        "demos); or a dir / hub id"),

    # --- evaluation ----------------------------------------------------------------------------
    "eval.splits": Key(("validation", "test"), Names("split", _registry("data", "SPLITS")),
                       "splits perplexity is reported on at the end", resume=True),
    "eval.stride": Key(0, COUNT, "window step; 0 means seq_len (non-overlapping blocks)",
                       resume=True),
    "eval.batch_size": Key(8, POSITIVE, "windows per evaluation step, global (padded to a "
                           "multiple of devices)", resume=True),
    "eval.max_tokens": Key(0, TokenCount(), ">0: evaluate only the first max_tokens tokens of "
                           "each split (quick checks)", resume=True),
    "eval.oneshot": Key(True, Bool(), "pruned and fine-tuned runs: also evaluate the first split "
                        "before fine-tuning", resume=True, group=True),
    # Zero-shot tasks are scored per run, after its program (tasks.py).
    "eval.tasks": Key((), Names("task", example="piqa,hellaswag"), "lm-evaluation-harness tasks "
                      "/ groups (lambada_openai, piqa, ...); () = none", resume=True, group=True),
    "eval.num_fewshot": Key(0, COUNT, "examples in each prompt (0 = zero-shot)",
                            resume=True, group=True),
    "eval.task_limit": Key(0, COUNT, ">0: score only the first task_limit documents of each task "
                           "(quick checks)", resume=True, group=True),
    "eval.task_dir": Key("", Str(), "a directory of extra task YAMLs (local tasks); \"\" = the "
                         "harness's own only", resume=True, group=True),

    # --- fine-tuning ---------------------------------------------------------------------------
    "train.steps": Key(0, COUNT, "> 0 wins over epochs"),
    "train.epochs": Key(0.0, Float(0.0, float(INT_MAX)),
                        "float; steps and epochs both 0 means no fine-tuning"),
    "train.batch_size": Key(8, POSITIVE, "global batch in sequences, split across all devices"),
    "train.grad_accum": Key(1, POSITIVE, "micro-batches per optimizer step (effective batch = "
                            "batch_size * grad_accum)"),
    "train.learning_rate": Key(5e-5, RATE, "peak learning rate (AdamW)", group=True),
    "train.warmup_steps": Key(0, COUNT, "0 = 5 % of the steps", group=True),
    "train.schedule": Key("cosine", Choice(("cosine", "linear", "constant")),
                          "cosine | linear | constant (decay after warmup)", group=True),
    "train.weight_decay": Key(0.01, Float(0.0),
                              "not applied to biases, LayerNorm and embeddings"),
    "train.b1": Key(0.9, RATIO, "AdamW's first-moment decay"),
    "train.b2": Key(0.999, RATIO, "AdamW's second-moment decay"),
    "train.grad_clip": Key(1.0, Float(0.0), "global-norm clipping; 0 disables"),
    "train.log_every": Key(10, POSITIVE, "steps between log lines", resume=True),
    "train.eval_every": Key(0, COUNT, "steps between validation evaluations; 0 = only at the end",
                            resume=True),
    "train.eval_max_tokens": Key(0, TokenCount(), ">0: periodic evaluations use only this many "
                                 "tokens of validation", resume=True),
    # Recomputing activations or sharding the state changes the program, not the numbers.
    "train.remat": Key("none", Choice(("none", "block")), "none | block: recompute each block's "
                       "activations in the backward pass (less memory, ~1/3 more compute; what "
                       "GPT-2 XL needs on 16 GiB chips: bench aot)", resume=True),

    # --- device mesh ---------------------------------------------------------------------------
    "mesh.fsdp": Key(1, DeviceGroup(), "1 = state replicated on every device; N > 1 = "
                     "parameters, masks and AdamW moments sharded over groups of N devices "
                     "(FSDP / ZeRO-3), the batch over all; -1 = all", resume=True),

    # --- distillation --------------------------------------------------------------------------
    "distill.teacher": Key("", Str(), '"" = off; a HF hub id / directory, or a workdir (its '
                           "export/ is used)"),
    "distill.temperature": Key(2.0, RATE, "softens both distributions before the KL term"),
    "distill.alpha": Key(0.5, Float(0.0, 1.0),
                         "loss = (1-alpha) CE + alpha T^2 KL(teacher || student)"),

    # --- checkpoints ---------------------------------------------------------------------------
    "checkpoint.every_steps": Key(500, POSITIVE, "also saved on SIGTERM, and at the end (see "
                                  "final_after_s)", resume=True, group=True),
    "checkpoint.keep": Key(2, POSITIVE, "last N kept (plus the best by validation perplexity)",
                           resume=True, group=True),
    "checkpoint.final_after_s": Key(60.0, Float(0.0), "save the last step too when the steps "
                                    "since the last save took longer", resume=True, group=True),

    # --- pruning: every key is an input of a program run side by side (masks, ratios) ---------
    "prune.method": Key("none", Choice(("none", *pruning.CRITERIA)),
                        "pruning criterion, none = dense (the choices: docs/config.md)",
                        group=True),
    "prune.targets": Key("mlp", Choice(tuple(pruning.TARGETS)),
                         "mlp (c_fc, c_proj) | attn (c_attn, c_proj) | all", group=True),
    "prune.blocks": Key(3, POSITIVE, "contiguous layer blocks (3 = front / middle / back)",
                        group=True),
    "prune.allocation": Key("uniform", Choice(allocation.ALLOCATIONS),
                            "ratios per block: explicit / layer read prune.ratios",
                            group=True, paired=True),
    "prune.ratios": Key((), Numbers(RATIO), "one ratio per block (explicit) or per layer (layer)",
                        group=True, paired=True),
    "prune.target": Key(0.5, Float(0.0, allocation.MAX_RATIO), "overall sparsity of the targeted "
                        "weights for generated allocations", group=True, paired=True),
    # Last minus first block ratio, ratios lie in [0, 1).
    "prune.spread": Key(0.2, Float(-1.0, 1.0), "linear: last block ratio minus first",
                        group=True, paired=True),
    "prune.growth": Key(1.5, RATE, "exponential: ratio factor from one block to the next",
                        group=True, paired=True),
    "prune.direction": Key("increasing", Choice(("increasing", "decreasing")),
                           "increasing (front to back) | decreasing", group=True, paired=True),
    "prune.owl_threshold": Key(5.0, RATE, "owl: outlier when |W|*||X|| > M * layer mean",
                               group=True),
    "prune.owl_lambda": Key(0.08, Float(0.0, 1.0),
                            "owl: per-layer ratios within target +- lambda", group=True),
    "prune.scope": Key("matrix", Choice(pruning.SCOPES),
                       "magnitude threshold taken per matrix | block | global", group=True),
    "prune.schedule": Key("oneshot", Choice(_registry("prune.plan", "SCHEDULES")),
                          "oneshot | gradual (GMP, cubic)", group=True),
    "prune.when": Key("before_finetune", Choice(("before_finetune", "after_finetune")),
                      "oneshot: before_finetune | after_finetune (no recovery)", group=True),
    "prune.start": Key(0.0, WHEN, "gradual: first step as a fraction of training (<=1) or a step "
                       "count (>1)", group=True),
    "prune.end": Key(0.5, WHEN, "gradual: last step where sparsity still grows (same units)",
                     group=True),
    "prune.every": Key(0.01, Float(0.0, float(INT_MAX), lo_open=True),
                       "gradual: mask update interval (same units)", group=True),
    "prune.initial": Key(0.0, RATIO, "gradual: starting sparsity s_i", group=True),
    "prune.compact": Key(True, Bool(), "neurons: evaluate with the pruned hidden units removed "
                         "(smaller, faster MLPs)", group=True),
    "prune.calib_batches": Key(8, POSITIVE, "data-aware methods and allocations: train-split "
                               "calibration sequences", group=True),
    "prune.pattern": Key("unstructured", Str(pruning.parse_pattern), "unstructured | N:M (e.g. "
                         "2:4): N zeros in every M consecutive inputs",
                         group=True, legacy="unstructured"),
    "prune.sequential": Key(False, Bool(), "calibrate each layer on the outputs of the pruned "
                            "layers below", group=True, legacy=False),
    # The methods' own options, prune.<method>_<option> (e.g. sparsegpt_damp): declared with
    # each method (prune/pruning.py's registry).
    **{f"prune.{k}": Key(o.default, o.rule, o.help, group=True, legacy=o.legacy)
       for k, o in pruning.option_keys().items()},
    "prune.sensitivity_ratios": Key(
        (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99),
        Numbers(Float(0.0, 1.0, lo_open=True, hi_open=True), nonempty=True, ascending=True),
        "sensitivity: ratios each block is probed at", group=True, legacy=CURRENT),
    "prune.sensitivity_rounds": Key(8, POSITIVE, "sensitivity: round 2+ probes each block at "
                                    "+-step around the solution, others as solved",
                                    group=True, legacy=CURRENT),
    "prune.search_evals": Key(64, POSITIVE, "search: calibration-loss evaluations of the "
                              "allocation search", group=True, legacy=CURRENT),
    "prune.score_split": Key("train", Choice(("train", "validation")), "sensitivity, search: "
                             "split scored on; validation if trained on train (memorised)",
                             group=True, legacy="train"),

    # --- where results go and how a sweep runs: a resume or a group may change them ----------
    "export.hf": Key(False, Bool(), "write the final model in Hugging Face format to "
                     "workdir/export/", resume=True, group=True),
    "runtime.compile_cache": Key("", Str(), 'JAX\'s persistent compilation cache; "" = '
                                 '<cache root>/jax_compile, "off"', resume=True, group=True),
    "sweep.controls": Key(True, Bool(), "add the dense model fine-tuned like the pruned runs (a "
                          "fair baseline)", resume=True, group=True),
    "sweep.batch_runs": Key(1, POSITIVE, "runs of one shape trained side by side as one program "
                            "(1 = one by one)", resume=True, group=True),
    "sweep.side_by_side": Key("auto", Choice(("auto", "vmap", "map")), "how: vmap (batched, for "
                              "accelerators) | map (lax.map, the CPU) | auto",
                              resume=True, group=True),
    # Weights & Biases is optional: wandb is imported only when mode is not disabled.
    "wandb.mode": Key("disabled", Choice(wandb_log.MODES), "disabled | online | offline (no "
                      "network: sync later with `wandb sync`)", resume=True, group=True),
    "wandb.project": Key("blockprune_jax", Str(), "the W&B project runs are logged to",
                         resume=True, group=True),
    "wandb.entity": Key("", Str(), '"" = your default entity', resume=True, group=True),
    "wandb.group": Key("", Str(), '"" = the sweep\'s name for runs of a sweep, none for a single '
                       "run", resume=True, group=True),
}


def get_config():
  """Every key at its default, as a ConfigDict of groups (model, data, train, ...)."""
  return config_lib.unflatten({k: key.default for k, key in KEYS.items()})
