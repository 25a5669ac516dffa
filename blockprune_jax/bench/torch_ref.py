"""transformers' PyTorch GPT-2 beside ours: the same shapes timed, our outputs checked against it.

    python -m blockprune_jax.bench.torch_ref train --preset=gpt2 --seq_len=1024 --batch=16 \
        --dtype=bfloat16 [--compile] --json=F
    python -m blockprune_jax.bench.torch_ref eval  --preset=gpt2 --seq_len=1024 --batch=32 \
        --dtype=bfloat16 [--compile] --json=F
    python -m blockprune_jax.bench.torch_ref all   --batch=16 --eval_batch=32 --impl=both ...
    python -m blockprune_jax.bench.torch_ref check --json=F   # our logits / perplexity vs references
    python -m blockprune_jax.bench.torch_ref summary F        # table: ours vs torch, checks, errors

Speed (`eval`, `train`, `all`): random weights, SDPA attention, bf16 autocast over float32
parameters (our models keep float32 parameters and compute in bf16 too), the loss taken from
float32 logits as in bench.py; train adds backward, gradient clipping at 1.0 and fused AdamW.
`--compile` (= `--impl=compile`) wraps model + loss in torch.compile (the optimizer step stays
eager); `--impl=both` times SDPA, then SDPA + torch.compile, in one process (each record is
written as soon as it is measured, so a compilation that times out loses only its own). `all`
runs eval, then train, for each implementation. Records are
`torch_eval` / `torch_train` with the same keys as bench.py's (tokens_per_s, step_ms, mfu,
gflop_per_token, peak_memory_gb: torch's allocator peak of this figure alone) plus impl
(sdpa | sdpa+compile) and first_step_s (includes compilation).

`check` builds a tiny random transformers GPT-2 (no hub access), saves it, reads it with hf_io
and compares on the default JAX device: logits in float32 (at full matmul precision) and in
bfloat16 (passes when our error against torch's float32 logits is at most twice torch's own
bf16-autocast error, plus a small floor), and the perplexity of that model on the accelerator
against the CPU (float32 within 1e-4 nats; bfloat16 within 2e-2 nats of the float32 CPU figure).
Each comparison is one `check_logits` / `check_perplexity` record with `pass`.
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np

from blockprune_jax import files  # stdlib + absl only: no JAX imported here

# Not JAX flags: argparse, so this module never clashes with bench.py's absl flags.
WHATS = ("eval", "train", "all", "check", "summary")


# --- shared -------------------------------------------------------------------------------

def parse_args(argv):
  from blockprune_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(prog="python -m blockprune_jax.bench.torch_ref", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("what", choices=WHATS)
  p.add_argument("path", nargs="?", help="summary: the figures.jsonl to read")
  p.add_argument("--preset", default="gpt2", choices=list(model_lib.PRESETS))
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=16, help="train batch (and eval's unless "
                 "--eval_batch is set)")
  p.add_argument("--eval_batch", type=int, default=0, help="eval batch; 0 = --batch")
  p.add_argument("--vocab_size", type=int, default=50257)
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, "
                 "autotuning, allocator warm-up)")
  p.add_argument("--impl", default="sdpa", choices=["sdpa", "compile", "both"],
                 help="sdpa: eager; compile: torch.compile model + loss; both: one, then the other")
  p.add_argument("--compile", action="store_true", help="same as --impl=compile")
  p.add_argument("--compile_backend", default="inductor", help="torch.compile backend")
  p.add_argument("--device", default="auto", help="auto (cuda if present) | cuda | cpu")
  p.add_argument("--json", default="", help="also append each record to this file")
  args = p.parse_args(argv)
  if args.compile:
    args.impl = "compile"
  if args.what == "summary" and not args.path:
    p.error("summary needs the figures.jsonl path")
  if args.steps < 1 or args.warmup < 1:
    p.error(f"--steps={args.steps} and --warmup={args.warmup} must be >= 1 (the first call "
            "compiles and must not be timed)")
  for name in ("batch", "seq_len", "vocab_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be positive")
  return args


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def emit(record: dict, args) -> dict:
  """Prints one JSON line and appends it to --json."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  record = {**record, "torch": torch.__version__, "transformers": transformers.__version__,
            "date": utc_now()}
  return files.emit_json_line(record, args.json)


def torch_device(name: str):
  import torch  # pylint: disable=import-outside-toplevel
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  return torch.device(name)


def device_kind(device) -> str:
  import torch  # pylint: disable=import-outside-toplevel
  return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device):
  """Waits for queued GPU work: CUDA calls return before the kernels finish."""
  import torch  # pylint: disable=import-outside-toplevel
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def autocast(device, dtype: str):
  import torch  # pylint: disable=import-outside-toplevel
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device.type, dtype=getattr(torch, dtype))


# --- speed --------------------------------------------------------------------------------

def build_model(args, device):
  """A random transformers GPT-2 of the preset's shape, SDPA attention, no dropout, float32."""
  import transformers  # pylint: disable=import-outside-toplevel
  from blockprune_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  n_layer, n_embd, n_head = model_lib.PRESETS[args.preset]
  cfg = transformers.GPT2Config(
      n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=args.vocab_size,
      n_positions=max(1024, args.seq_len), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=args.vocab_size - 1, eos_token_id=args.vocab_size - 1)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
  return model.to(device)


def make_loss(model, vocab: int, reduction: str):
  """(ids, labels) -> cross entropy of float32 logits, like our steps' token_nll."""
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def loss(ids, labels):
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1),
                           reduction=reduction)
  return loss


def maybe_compile(fn, args, compiled: bool):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.compile(fn, backend=args.compile_backend) if compiled else fn


def time_calls(fn, device, steps: int, warmup: int):
  """(seconds per timed call, seconds of the first call): warm-up calls, then timed ones."""
  t0 = time.perf_counter()
  fn()
  synchronize(device)
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    fn()
  synchronize(device)
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  synchronize(device)
  return (time.perf_counter() - t0) / steps, first


def random_batch(args, batch, device, extra=0):
  import torch  # pylint: disable=import-outside-toplevel
  gen = torch.Generator().manual_seed(0)
  return torch.randint(0, args.vocab_size, (batch, args.seq_len + extra), generator=gen).to(device)


def bench_eval(args, device, compiled):
  """Forward + summed NLL of one batch under inference_mode: what our eval step does."""
  import torch  # pylint: disable=import-outside-toplevel
  model = build_model(args, device).eval()
  batch = args.eval_batch or args.batch
  ids = random_batch(args, batch, device)
  loss = maybe_compile(make_loss(model, args.vocab_size, "sum"), args, compiled)

  def one():
    with torch.inference_mode(), autocast(device, args.dtype):
      return loss(ids, ids)
  return _measure("torch_eval", one, batch, device, args, compiled, train=False)


def bench_train(args, device, compiled):
  """Forward, backward, clipping at 1.0 and fused AdamW with decay on matrices only (as ours)."""
  import torch  # pylint: disable=import-outside-toplevel
  model = build_model(args, device).train()
  seq = random_batch(args, args.batch, device, extra=1)
  ids, labels = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
  decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n
           and "wpe" not in n]
  rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "wte" not in n
                                                         and "wpe" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                           {"params": rest, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95),
                          fused=device.type == "cuda")
  loss = maybe_compile(make_loss(model, args.vocab_size, "mean"), args, compiled)

  def one():
    with autocast(device, args.dtype):
      value = loss(ids, labels)
    value.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value
  return _measure("torch_train", one, args.batch, device, args, compiled, train=True)


def _measure(what, fn, batch, device, args, compiled, train):
  import torch  # pylint: disable=import-outside-toplevel
  from blockprune_jax import flops  # pylint: disable=import-outside-toplevel
  from blockprune_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  sec, first = time_calls(fn, device, args.steps, args.warmup)
  tok_s = batch * args.seq_len / sec
  f = flops.flops_per_token(model_lib.preset(args.preset, vocab_size=args.vocab_size),
                            args.seq_len, train)  # the same shape as ours: the same count
  peak = flops.peak_flops_for(device_kind(device)) if device.type == "cuda" else None
  mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
  return emit({"bench": what, "impl": "sdpa+compile" if compiled else "sdpa",
               "compile_backend": args.compile_backend if compiled else None,
               "preset": args.preset, "seq_len": args.seq_len, "batch": batch,
               "dtype": args.dtype, "tokens_per_s": round(tok_s), "step_ms": round(sec * 1e3, 3),
               "first_step_s": round(first, 3), "steps": args.steps, "warmup": args.warmup,
               "mfu": round(tok_s * f / peak, 4) if peak else None,
               "gflop_per_token": round(f / 1e9, 4),
               "peak_memory_gb": round(mem, 3) if mem is not None else None,
               "backend": device.type, "device_kind": device_kind(device)}, args)


def run_speed(args) -> int:
  """eval / train / all, per --impl; returns the number of failed figures (each recorded)."""
  import torch  # pylint: disable=import-outside-toplevel
  device = torch_device(args.device)
  whats = {"eval": [bench_eval], "train": [bench_train], "all": [bench_eval, bench_train]}
  modes = {"sdpa": [False], "compile": [True], "both": [False, True]}
  failed = 0
  for compiled in modes[args.impl]:
    for fn in whats[args.what]:
      try:
        fn(args, device, compiled)
      except Exception as e:  # pylint: disable=broad-except  # record it, go on with the next
        failed += 1
        emit({"bench": "torch_" + fn.__name__.split("_")[1], "error":
              f"{type(e).__name__}: {e}"[:1000], "impl": "sdpa+compile" if compiled else "sdpa"},
             args)
      # Free this figure's model and compiled graphs before the next one measures its memory.
      torch._dynamo.reset()  # pylint: disable=protected-access
      gc.collect()
      if device.type == "cuda":
        torch.cuda.empty_cache()
  return failed


# --- correctness --------------------------------------------------------------------------

def tiny_hf_model(seed=0, vocab=1000, n_positions=128):
  """A 2-layer transformers GPT-2 with every parameter randomised at a scale where attention
  is far from uniform and logits spread out, so a wrong mask or layout shows in the numbers."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=n_positions,
                                vocab_size=vocab, resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def torch_logits(model, ids, device, dtype):
  import torch  # pylint: disable=import-outside-toplevel
  model = model.to(device)
  with torch.inference_mode(), autocast(device, dtype):
    out = model(input_ids=torch.as_tensor(ids, device=device), use_cache=False).logits
  return out.float().cpu().numpy()


def rel_err(a, ref) -> float:
  """max |a - ref| / max |ref|: one number per comparison, scale-free."""
  return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def check_logits(hf_dir, hf_model, args, device):
  """Our logits on the default JAX device vs transformers' on `device`, float32 and bf16."""
  import jax  # pylint: disable=import-outside-toplevel
  from blockprune_jax import hf_io  # pylint: disable=import-outside-toplevel
  from blockprune_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  ids = np.random.RandomState(1).randint(0, hf_model.config.vocab_size, (2, 64)).astype(np.int32)
  ref = torch_logits(hf_model, ids, device, "float32")

  def ours(dtype, precision=None):
    cfg = hf_io.load_config(hf_dir, dtype=dtype, dropout=0.0)
    params = hf_io.load_params(hf_dir, cfg)
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
      out = jax.jit(model_lib.logits_fn(cfg))(params, ids)
    return np.asarray(out, np.float32)

  # float32 at full precision checks the math; the default (TF32 on recent GPUs) is reported.
  exact, default = rel_err(ours("float32", "highest"), ref), rel_err(ours("float32"), ref)
  out = [emit(_check("check_logits", "float32", exact, 1e-4,
                     rel_err_default_precision=round(default, 8)), args)]
  ours_bf16 = ours("bfloat16")
  torch_err = rel_err(torch_logits(hf_model, ids, device, "bfloat16"), ref)
  top1 = float(np.mean(ours_bf16.argmax(-1) == ref.argmax(-1)))
  out.append(emit(_check("check_logits", "bfloat16", rel_err(ours_bf16, ref),
                         max(2 * torch_err, 1e-3), torch_bf16_rel_err=round(torch_err, 8),
                         top1_agree=top1), args))
  return out


def check_perplexity(hf_dir, args):
  """Perplexity of the tiny model on the default JAX device vs the CPU."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  from blockprune_jax import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from blockprune_jax import hf_io  # pylint: disable=import-outside-toplevel
  from blockprune_jax import model as model_lib  # pylint: disable=import-outside-toplevel
  from blockprune_jax import parallel  # pylint: disable=import-outside-toplevel

  def loss_on(device, dtype, precision=None):
    cfg = hf_io.load_config(hf_dir, dtype=dtype, dropout=0.0)
    stream = np.random.RandomState(2).randint(0, cfg.vocab_size, 64 * 12 + 1)
    mesh = Mesh(np.array([device]), (parallel.AXIS,))
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
      r = eval_lib.evaluate(model_lib.logits_fn(cfg), hf_io.load_params(hf_dir, cfg), stream,
                            seq_len=64, stride=32, batch_size=8, mesh=mesh, progress=False)
    return r["loss"]

  accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
  cpu_f32 = loss_on(cpu, "float32", "highest")
  out = []
  for dtype, precision, tol in (("float32", "highest", 1e-4), ("bfloat16", None, 2e-2)):
    same = accel == cpu and dtype == "float32"  # a CPU-only run: nothing to compute twice
    dev = cpu_f32 if same else loss_on(accel, dtype, precision)
    out.append(emit(_check(
        "check_perplexity", dtype, abs(dev - cpu_f32), tol, device_loss=round(dev, 6),
        cpu_float32_loss=round(cpu_f32, 6), device_perplexity=round(float(np.exp(dev)), 4),
        cpu_float32_perplexity=round(float(np.exp(cpu_f32)), 4)), args))
  return out


def _check(name, dtype, err, tol, **extra):
  import jax  # pylint: disable=import-outside-toplevel
  return {"bench": name, "dtype": dtype, "err": round(err, 8), "tol": tol,
          "pass": bool(err <= tol), "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, **extra}


def run_checks(args) -> int:
  """Every correctness check; returns the number that failed or could not run."""
  # Both frameworks share the accelerator here: JAX must not grab 75 % of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  device = torch_device(args.device)
  bad = 0
  with tempfile.TemporaryDirectory() as hf_dir:
    hf_model = tiny_hf_model()
    hf_model.save_pretrained(hf_dir)
    for name, fn in (("check_logits", lambda: check_logits(hf_dir, hf_model, args, device)),
                     ("check_perplexity", lambda: check_perplexity(hf_dir, args))):
      try:
        bad += sum(not r["pass"] for r in fn())
      except Exception as e:  # pylint: disable=broad-except  # record it, run the next check
        bad += 1
        emit({"bench": name, "error": f"{type(e).__name__}: {e}"[:1000], "pass": False}, args)
  return bad


# --- summary ------------------------------------------------------------------------------

def read_records(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip().startswith("{")]


def summary(path) -> str:
  """A plain-text table of figures.jsonl: each figure, ours then torch's, with ours / theirs;
  then mask overhead, compact speedup, checks, step times and errors."""
  recs = read_records(path)

  def find(bench, **match):
    hits = [r for r in recs if r.get("bench") == bench and "error" not in r
            and all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None

  lines = [f"{'figure':<7} {'implementation':<15} {'tokens/s':>11} {'step ms':>9} {'MFU':>6} "
           f"{'peak GB':>8} {'compile s':>9} {'ours / it':>9}"]
  for what in ("eval", "train"):
    ours = find(what)
    rows = [("ours (JAX)", ours, "compile_s"),
            ("torch sdpa", find("torch_" + what, impl="sdpa"), "first_step_s"),
            ("torch compile", find("torch_" + what, impl="sdpa+compile"), "first_step_s")]
    for name, r, compile_key in rows:
      ratio = ours["tokens_per_s"] / r["tokens_per_s"] if ours and r and r is not ours else None
      lines.append(f"{what:<7} {name:<15} {_fmt(r, 'tokens_per_s'):>11} "
                   f"{_fmt(r, 'step_ms', '.1f'):>9} {_fmt(r, 'mfu', '.3f'):>6} "
                   f"{_fmt(r, 'peak_memory_gb', '.1f'):>8} {_fmt(r, compile_key, '.1f'):>9} "
                   f"{_num(ratio, '.2f'):>9}")
  lines.append(f"mask overhead {_fmt(find('mask_overhead'), 'overhead', '+.1%')}, compact "
               f"speedup {_fmt(find('compact_speedup'), 'speedup', '.2f')}x (torch compile s: "
               "first step, compilation included; ours peak GB: the process so far)")
  for r in recs:
    if r.get("bench") == "side_by_side" and "error" not in r:
      lines.append(f"side by side: {r['runs']} runs' {r['step']} step ({r['mode']}) costs "
                   f"{r['per_run_ratio']:.2f}x one run's, per run")
  sweep = find("sweep")
  if sweep:
    lines.append(f"sweep of {sweep['runs']} runs: {sweep['wall_s']:.1f} s one after another, "
                 f"{_fmt(sweep, 'side_by_side_wall_s', '.1f')} s side by side (ratio "
                 f"{_fmt(sweep, 'side_by_side_ratio', '.2f')}); later runs "
                 f"{sweep['overhead_share_later']:.0%} outside steady-state steps")
  lines += [f"{r['bench']:<17} {r['dtype']:<9} err {r['err']:.2e} tol {r['tol']:.0e} "
            f"{'PASS' if r['pass'] else 'FAIL'}" for r in recs if "pass" in r and "error" not in r]
  lines += [f"step {r['step']:<10} {r['seconds']:7.1f} s  exit {r['rc']}"
            for r in recs if r.get("bench") == "step_time"]
  lines += [f"ERROR {r['bench']}: {r['error'][:160]}" for r in recs if "error" in r]
  return "\n".join(lines)


def _num(x, spec=",.0f"):
  return "-" if x is None else format(x, spec)


def _fmt(rec, key, spec=",.0f"):
  return _num(rec.get(key) if rec else None, spec)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.what == "summary":
    print(summary(args.path))
    return 0
  if args.what == "check":
    return 1 if run_checks(args) else 0
  return 1 if run_speed(args) else 0


if __name__ == "__main__":
  sys.exit(main())
