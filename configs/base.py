"""Shared defaults for every blockprune_jax experiment.

Every other config starts from `get_config()` here and changes a few keys.
Any key can be overridden on the command line, e.g.

    python -m blockprune_jax.main --config=configs/eval.py --workdir=runs/x \
        --config.model.name_or_path=gpt2-medium --config.eval.batch_size=4
"""
import ml_collections

from blockprune_jax.prune import pruning


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds init, data order, dropout, random pruning, calibration picks
  c.role = "experiment"  # "base" for the dense base model a from-scratch study trains first

  # --- model -------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.init = "pretrained"  # pretrained (hub id or local HF dir) | scratch (random init)
  m.name_or_path = "gpt2"  # hub id, or a directory with config.json + model.safetensors/pytorch_model.bin
  m.n_layer = 12  # shape of a scratch model (a checkpoint brings its own)
  m.n_embd = 768  # width of a scratch model
  m.n_head = 12  # attention heads of a scratch model (must divide n_embd)
  m.n_positions = 1024  # longest sequence a scratch model takes (>= data.seq_len)
  m.dropout = 0.1  # embedding and residual dropout during training (GPT-2's 0.1)
  m.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  m.attention = "auto"  # auto (cuDNN on GPU when possible, else XLA) | cudnn | xla
  # Same model, dropout draws differ; evaluation stays unrolled (docs/scale.md).
  m.scan_layers = False  # train the blocks as one lax.scan: with mesh.fsdp, one block's weights gathered at a time

  # --- base model trained from scratch (offline studies) --------------------------
  c.base = b = ml_collections.ConfigDict()
  b.steps = 0  # > 0 with model.init=scratch: first train a dense base for this many steps,
  # export it and prune/fine-tune that instead (a sweep trains it once for all its runs)
  b.dir = ""  # where the base run lives; "" = <workdir>/base (a sweep sets <sweep>/base)
  b.learning_rate = 1e-3  # base training uses its own (higher) learning rate
  b.batch_size = 0  # 0 = train.batch_size
  b.seed = 0  # the base's own seed, so runs that differ only in seed share one base

  # --- data --------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = "hf"  # hf (datasets.load_dataset) | text (local files) | builtin (offline corpus)
  d.hf_path = "wikitext"  # source=hf: the dataset's hub name
  d.hf_name = "wikitext-2-raw-v1"  # source=hf: its configuration ("" for none)
  d.text_dir = ""  # for source=text: wiki.{train,valid,test}.{raw,tokens} or {train,validation,test}.txt
  d.seq_len = 1024  # tokens per sequence
  d.cache_dir = ""  # token stream cache; "" = ~/.cache/blockprune_jax (or $BLOCKPRUNE_CACHE)
  d.tokenizer = ""  # "" = the checkpoint's own (offline GPT-2 BPE if none); "gpt2-offline"; or a dir / hub id

  # --- evaluation ----------------------------------------------------------
  c.eval = e = ml_collections.ConfigDict()
  e.splits = ("validation", "test")  # splits perplexity is reported on at the end
  e.stride = 0  # window step; 0 means seq_len (non-overlapping blocks)
  e.batch_size = 8  # windows per evaluation step, global (padded to a multiple of devices)
  e.max_tokens = 0  # >0: evaluate only the first max_tokens tokens of each split (quick checks)
  e.oneshot = True  # pruned and fine-tuned runs: also evaluate the first split before fine-tuning
  e.tasks = ()  # lm-evaluation-harness tasks / groups (lambada_openai, piqa, ...); () = none
  e.num_fewshot = 0  # examples in each prompt (0 = zero-shot)
  e.task_limit = 0  # >0: score only the first task_limit documents of each task (quick checks)
  e.task_dir = ""  # a directory of extra task YAMLs (local tasks); "" = the harness's own only

  # --- fine-tuning -----------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.steps = 0  # > 0 wins over epochs
  t.epochs = 0.0  # float; steps and epochs both 0 means no fine-tuning
  t.batch_size = 8  # global batch in sequences, split across all devices
  t.grad_accum = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
  t.learning_rate = 5e-5  # peak learning rate (AdamW)
  t.warmup_steps = 0  # 0 = 5 % of the steps
  t.schedule = "cosine"  # cosine | linear | constant (decay after warmup)
  t.weight_decay = 0.01  # not applied to biases, LayerNorm and embeddings
  t.b1 = 0.9  # AdamW's first-moment decay
  t.b2 = 0.999  # AdamW's second-moment decay
  t.grad_clip = 1.0  # global-norm clipping; 0 disables
  t.log_every = 10  # steps between log lines
  t.eval_every = 0  # steps between validation evaluations; 0 = only at the end
  t.eval_max_tokens = 0  # >0: periodic evaluations use only this many tokens of validation
  t.remat = "none"  # none | block: recompute each block's activations in the backward pass
  # (less memory, ~1/3 more compute; what GPT-2 XL needs on 16 GiB chips: bench aot)

  # --- device mesh -------------------------------------------------------------
  c.mesh = ms = ml_collections.ConfigDict()
  ms.fsdp = 1  # 1 = state replicated on every device; N > 1 = parameters, masks and AdamW
  # moments sharded over groups of N devices (FSDP / ZeRO-3), the batch over all; -1 = all

  # --- distillation ----------------------------------------------------------
  c.distill = ds = ml_collections.ConfigDict()
  ds.teacher = ""  # "" = off; a HF hub id / directory, or a workdir (its export/ is used)
  ds.temperature = 2.0  # softens both distributions before the KL term
  ds.alpha = 0.5  # loss = (1-alpha) CE + alpha T^2 KL(teacher || student)

  # --- checkpoints -----------------------------------------------------------
  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every_steps = 500  # also saved on SIGTERM, and at the end (see final_after_s)
  ck.keep = 2  # last N kept (plus the best by validation perplexity)
  ck.final_after_s = 60.0  # save the last step too when the steps since the last save took longer

  # --- pruning -----------------------------------------------------------
  c.prune = p = ml_collections.ConfigDict()
  p.method = "none"  # pruning criterion, none = dense (the choices: docs/config.md)
  p.targets = "mlp"  # mlp (c_fc, c_proj) | attn (c_attn, c_proj) | all
  p.blocks = 3  # contiguous layer blocks (3 = front / middle / back)
  p.allocation = "uniform"  # ratios per block: explicit / layer read prune.ratios
  p.ratios = ()  # one ratio per block (explicit) or per layer (layer)
  p.target = 0.5  # overall sparsity of the targeted weights for generated allocations
  p.spread = 0.2  # linear: last block ratio minus first
  p.growth = 1.5  # exponential: ratio factor from one block to the next
  p.direction = "increasing"  # increasing (front to back) | decreasing
  p.owl_threshold = 5.0  # owl: outlier when |W|*||X|| > M * layer mean
  p.owl_lambda = 0.08  # owl: per-layer ratios within target +- lambda
  p.scope = "matrix"  # magnitude threshold taken per matrix | block | global
  p.schedule = "oneshot"  # oneshot | gradual (GMP, cubic)
  p.when = "before_finetune"  # oneshot: before_finetune | after_finetune (no recovery)
  p.start = 0.0  # gradual: first step as a fraction of training (<=1) or a step count (>1)
  p.end = 0.5  # gradual: last step where sparsity still grows (same units)
  p.every = 0.01  # gradual: mask update interval (same units)
  p.initial = 0.0  # gradual: starting sparsity s_i
  p.compact = True  # neurons: evaluate with the pruned hidden units removed (smaller, faster MLPs)
  p.calib_batches = 8  # data-aware methods and allocations: train-split calibration sequences
  p.pattern = "unstructured"  # unstructured | N:M (e.g. 2:4): N zeros in every M consecutive inputs
  p.sequential = False  # calibrate each layer on the outputs of the pruned layers below
  # The methods' own options, prune.<method>_<option> (e.g. sparsegpt_damp, sparsegpt_blocksize):
  # their defaults and meanings are declared with each method (prune/pruning.py's registry).
  p.update(pruning.option_defaults())
  p.sensitivity_ratios = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)  # sensitivity: ratios each block is probed at
  p.sensitivity_rounds = 8  # sensitivity: round 2+ probes each block at +-step around the solution, others as solved
  p.search_evals = 64  # search: calibration-loss evaluations of the allocation search
  p.score_split = "train"  # sensitivity, search: split scored on; validation if trained on train (memorised)

  # --- export ------------------------------------------------------------
  c.export = ex = ml_collections.ConfigDict()
  ex.hf = False  # write the final model in Hugging Face format to workdir/export/

  # --- runtime ---------------------------------------------------------------
  c.runtime = rt = ml_collections.ConfigDict()
  rt.compile_cache = ""  # JAX's persistent compilation cache; "" = <cache root>/jax_compile, "off"

  # --- sweeps ----------------------------------------------------------------
  c.sweep = sw = ml_collections.ConfigDict()
  sw.controls = True  # add the dense model fine-tuned like the pruned runs (a fair baseline)
  sw.batch_runs = 1  # runs of one shape trained side by side as one program (1 = one by one)
  sw.side_by_side = "auto"  # how: vmap (batched, for accelerators) | map (lax.map, the CPU) | auto

  # --- Weights & Biases (optional; wandb is imported only when mode is not disabled) -----
  c.wandb = wb = ml_collections.ConfigDict()
  wb.mode = "disabled"  # disabled | online | offline (no network: sync later with `wandb sync`)
  wb.project = "blockprune_jax"  # the W&B project runs are logged to
  wb.entity = ""  # "" = your default entity
  wb.group = ""  # "" = the sweep's name for runs of a sweep, none for a single run

  return c
