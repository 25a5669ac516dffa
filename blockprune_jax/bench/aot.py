"""Will it fit? The real train and eval steps compiled for a TPU slice or GPUs, on any host.

    python -m blockprune_jax.bench aot --topology=v5e:2x4 --preset=gpt2-xl --seq_len=1024 \
        --batch=32 --dtype=bfloat16 --fsdp=8 --remat=block
    python -m blockprune_jax.bench aot --topology=h100:8 ...  # GPU kind:count (gpu_targets/)

As MaxText's train_compile.py: `jax.experimental.topologies` describes the slice's chips without
any of them present, the steps are lowered for a mesh over those devices from shapes alone
(jax.ShapeDtypeStruct with shardings, nothing allocated) and compiled by libtpu or JAX's CUDA
plugin (a GPU described by our target config in gpu_targets/), and XLA's memory_analysis() says
what one chip needs. The train step is the one a run uses
(train.make_train_step: masked AdamW fine-tuning with the masks of a 50 % MLP pruning run,
dropout on, the state donated, sharded as mesh.fsdp=--fsdp lays it out); the eval step is
evaluate.make_eval_step's. `--batch` is the global batch (sequences per chip = batch / chips).

One JSON line per step on stdout (bytes per chip); one line a person reads per step on stderr.
A program that does not fit in HBM is a result (fits: false, with what XLA says it needs),
not a traceback. Needs libtpu, the TPU compiler: `pip install -r requirements-aot.txt`; for
GPUs the CUDA plugin and cuDNN: requirements-gpu-aot.txt, in a separate environment (the plugin
logs CUDA warnings in every CPU run). A GPU program may use JAX's preallocated share of the
GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default): that is its hbm_bytes.
"""
import dataclasses
import importlib.util
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from blockprune_jax import evaluate as eval_lib
from blockprune_jax import model as model_lib
from blockprune_jax import parallel
from blockprune_jax import train
from blockprune_jax.errors import UserError

GIB = 2**30
GPU_TARGETS = os.path.join(os.path.dirname(__file__), "gpu_targets")
MLP_SPARSITY = 0.5  # only the masks' shapes matter: a 50 % MLP pruning run's masks


def tpu_devices(topology: str):
  """The compile-only devices of a TPU slice ("v5e:2x4", "v4:2x2x1", "v6e:2x2", ...)."""
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"bench aot compiles with libtpu, which is not installed: pip install "
                    f"\"jax[tpu]=={jax.__version__}\" (requirements-aot.txt pins it)")
  # libtpu takes a lock file for a real TPU; compiling only, other JAX processes may hold it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return topologies.get_topology_desc(topology, "tpu").devices
  except Exception as e:  # pylint: disable=broad-except  # JaxRuntimeError: INVALID_ARGUMENT
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise UserError(f"--topology={topology!r} is no TPU slice JAX knows ({first}): use names "
                    "like v4:2x2x1, v5e:2x4, v6e:2x4") from None


def gpu_devices(topology: str):
  """(compile-only devices, usable bytes per GPU) of a GPU target "h100:8" (kind:count)."""
  kind, _, count = topology.partition(":")
  known = sorted(f[:-len(".txtpb")] for f in os.listdir(GPU_TARGETS) if f.endswith(".txtpb"))
  if kind not in known or not count.isdigit() or int(count) < 1:
    raise UserError(f"--topology={topology!r} is no GPU target (kind:count, kinds: "
                    f"{', '.join(known)}) nor a TPU slice (like v5e:2x4)")
  if not model_lib.cuda_plugin_installed():
    raise UserError(f"compiling for {kind} needs JAX's CUDA plugin, which is not installed: pip "
                    f"install \"jax[cuda12]=={jax.__version__}\" (requirements-gpu-aot.txt)")
  path = os.path.join(GPU_TARGETS, f"{kind}.txtpb")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    devices = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                           target_config=text).devices
  except Exception as e:  # pylint: disable=broad-except  # a field this jaxlib does not know
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise UserError(f"{path}: jaxlib {jax.__version__} cannot read this GPU target ({first}): "
                    "a field newer than this jaxlib?") from None
  memory = int(re.search(r"device_memory_size: (\d+)", text).group(1))
  return devices, int(memory * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)))


def available_hbm(mesh) -> int:
  """Bytes of HBM a program may use on one chip, as the TPU compiler reports it: read from the
  out-of-memory error of a program far too big for any chip."""
  too_big = jax.ShapeDtypeStruct((mesh.devices.size, 2**40 // 4), jnp.float32,
                                 sharding=NamedSharding(mesh, P(mesh.axis_names)))
  try:
    jax.jit(lambda x: x + 1).lower(too_big).compile()
  except Exception as e:  # pylint: disable=broad-except
    found = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(e))
    if found:
      return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)
  raise RuntimeError("the TPU compiler did not report its HBM size")


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def train_args(cfg, mesh, batch: int, seq_len: int):
  """Abstract (state, batch, teacher, learning rate) of one fine-tuning step, laid out as a
  run with this mesh lays them out (parallel.place_state, parallel.shard_batch)."""
  settings = train.OptimizerSettings(b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
  optimizer = train.build_optimizer(settings, lambda count: 1e-4)  # a schedule, as in runs
  params = model_lib.init_shapes(cfg)
  masks = {f"h_{i}": {"mlp": {name: {"kernel": jax.ShapeDtypeStruct(
      params[f"h_{i}"]["mlp"][name]["kernel"].shape, jnp.bool_)} for name in ("c_fc", "c_proj")}}
           for i in range(cfg.n_layer)}
  # The state of train.init_state; its big leaves as shapes only.
  state = dict(train.init_state({}, optimizer, {}, 0), params=params, masks=masks,
               opt_state=jax.eval_shape(optimizer.init, params))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
  if parallel.FSDP in mesh.axis_names:
    state = _abstract(state, parallel.state_shardings(mesh, state))
  else:
    state = _abstract(state, jax.tree.map(lambda _: NamedSharding(mesh, P()), state))
  tokens = jax.ShapeDtypeStruct((1, batch, seq_len + 1), jnp.int32,
                                sharding=NamedSharding(mesh, P(None, parallel.batch_axes(mesh))))
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  return train.make_train_step(cfg, settings, mesh), (state, tokens, {}, lr)


def eval_args(cfg, mesh, batch: int, seq_len: int):
  """Abstract (params, inputs, labels, weights) of one evaluation step: parameters replicated
  (evaluate.evaluate places them so), windows split over every chip."""
  params = model_lib.init_shapes(cfg)
  params = _abstract(params, jax.tree.map(lambda _: NamedSharding(mesh, P()), params))
  rows = NamedSharding(mesh, P(parallel.batch_axes(mesh)))
  ids, labels = (jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows)
                 for _ in range(2))
  weights = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=rows)
  return eval_lib.make_eval_step(model_lib.logits_fn(cfg), mesh), (params, ids, labels, weights)


def _argument_bytes(args) -> int:
  """Bytes of the arguments on one chip (the first device's shard of every leaf)."""
  total = 0
  for x in jax.tree.leaves(args):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def _needed_bytes(message: str):
  """What an out-of-memory compile says the program needs (bytes), or None."""
  found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
  if not found:
    found = re.search(r"Used ([\d.]+)([KMGT]) of", message)
  if not found:
    return None
  return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)


def compile_memory(step, args, hbm: int) -> dict:
  """Compiles step(*args); the per-chip memory record (fits: False on RESOURCE_EXHAUSTED) and
  whether the program calls cuDNN's fused attention."""
  t0 = time.perf_counter()
  try:
    compiled = step.lower(*args).compile()
    m = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    temp = _needed_bytes(message)
    arg = _argument_bytes(args)
    return {"argument_bytes": arg, "output_bytes": None, "alias_bytes": None,
            "temp_bytes": temp, "total_bytes": arg + temp if temp is not None else None,
            "hbm_bytes": hbm, "fits": False, "compile_s": round(time.perf_counter() - t0, 1),
            "fused_attention": None, "error": message.strip().splitlines()[0][:400]}
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
          "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
          "total_bytes": total, "hbm_bytes": hbm, "fits": total <= hbm,
          "compile_s": round(time.perf_counter() - t0, 1),
          "fused_attention": "__cudnn$fmha" in compiled.as_text()}


def human_line(record: dict) -> str:
  """'gpt2-xl train on v5e:2x4: needs 11.2 GiB of 15.75 GiB per chip: fits'."""
  need = record["total_bytes"]
  needs = f"needs {need / GIB:.1f} GiB" if need is not None else "needs more"
  verdict = "fits" if record["fits"] else "does not fit"
  return (f"{record['preset']} {record['step']} on {record['topology']}: {needs} of "
          f"{record['hbm_bytes'] / GIB:.2f} GiB per chip ({record['per_chip_batch']} sequences "
          f"per chip, fsdp={record['fsdp']}, remat={record['remat']}): {verdict}")


@dataclasses.dataclass(frozen=True)
class Slice:
  """One model on one TPU slice or GPU target, ready to compile its steps at any batch."""
  topology: str
  platform: str  # tpu | cuda
  preset: str
  devices: tuple
  mesh: object
  hbm: int
  cfg: model_lib.GPT2Config
  seq_len: int
  fsdp: int


def prepare(*, topology: str, preset: str, seq_len: int, dtype: str, fsdp: int, remat: str,
            scan_layers: bool = False) -> Slice:
  if preset not in model_lib.PRESETS:
    raise UserError(f"--preset={preset}: expected one of {', '.join(model_lib.PRESETS)}")
  gpu = re.fullmatch(r"[^:]+:\d+", topology)
  devices, hbm = gpu_devices(topology) if gpu else (tpu_devices(topology), None)
  mesh = parallel.train_mesh(fsdp, devices=devices)
  cfg = model_lib.preset(preset, dtype=dtype, n_positions=max(1024, seq_len), remat=remat,
                         scan_layers=scan_layers)
  return Slice(topology, "cuda" if gpu else "tpu", preset, tuple(devices), mesh,
               hbm or available_hbm(mesh), cfg, seq_len, fsdp)


def compile_step(s: Slice, what: str, batch: int) -> dict:
  """The record of one step ("train" | "eval") at global batch `batch` (bytes per chip)."""
  n = len(s.devices)
  if batch < 1 or batch % n:
    name = "batch" if what == "train" else "eval_batch"
    raise UserError(f"--{name}={batch} must be a positive multiple of the {n} chips of "
                    f"{s.topology}")
  train_step = what == "train"
  build = train_args if train_step else eval_args
  step, args = build(s.cfg if train_step else dataclasses.replace(s.cfg, remat="none"),
                     s.mesh, batch, s.seq_len)
  kind = "gpu_kind" if s.platform == "cuda" else "tpu_kind"
  return {"bench": "aot", "step": what, "topology": s.topology, "platform": s.platform,
          "preset": s.preset, "chips": n, kind: s.devices[0].device_kind, "seq_len": s.seq_len,
          "batch": batch, "per_chip_batch": batch // n, "dtype": s.cfg.dtype,
          "fsdp": parallel.fsdp_size(s.fsdp, n) if train_step else 1,
          "remat": s.cfg.remat if train_step else "none",
          "scan_layers": s.cfg.scan_layers and train_step,
          **compile_memory(step, args, s.hbm), **_compiler_version(s.platform)}


def run(*, batch: int, eval_batch: int, steps=("train", "eval"), **slice_flags):
  """Yields one record per step (dicts, sizes in bytes per chip); slice_flags: prepare()'s."""
  s = prepare(**slice_flags)
  for what in steps:
    yield compile_step(s, what, batch if what == "train" else eval_batch)


def largest_batch(s: Slice, what: str, *, guess: int, cap: int, emit=None):
  """(largest power-of-two sequences per chip <= cap whose step fits, its record), or (0, the
  record of 1 per chip) where none does. Gallops from `guess`: up while it fits, down while
  not, so a good guess costs two compiles. emit (optional) gets every record."""
  n, cache = len(s.devices), {}

  def fits(per_chip):
    if per_chip not in cache:
      cache[per_chip] = compile_step(s, what, per_chip * n)
      if emit:
        emit(cache[per_chip])
    return cache[per_chip]["fits"]

  b = min(max(1, guess), cap)
  if fits(b):
    while b < cap and fits(2 * b):
      b *= 2
    return b, cache[b]
  while b > 1:
    b //= 2
    if fits(b):
      return b, cache[b]
  return 0, cache[1]


def fit_table(*, presets, topologies, cap: int = 64, emit=None, **slice_flags) -> str:
  """The "Will it fit?" table: for every preset and slice, the largest power-of-two sequences per
  chip of the train and the eval step, with what that needs per chip (markdown)."""
  head = ["model"] + [f"{t} {w}" for t in topologies for w in ("train", "eval")]
  rows = [head, ["---"] * len(head)]
  # A bigger model fits at most what a smaller one did on the same slice: that is the guess.
  guesses = {(t, w): min(16, cap) for t in topologies for w in ("train", "eval")}
  for preset in presets:
    row = [preset]
    for topology in topologies:
      s = prepare(topology=topology, preset=preset, **slice_flags)
      for what in ("train", "eval"):
        b, record = largest_batch(s, what, guess=guesses[topology, what], cap=cap, emit=emit)
        guesses[topology, what] = max(b, 1)
        need = record["total_bytes"]
        row.append(f"{b} ({need / GIB:.1f} GiB)" if b else
                   f"none (1 needs {need / GIB:.1f} GiB)" if need else "none")
        if b == cap:
          row[-1] = f"≥ {row[-1]}"
    rows.append(row)
  return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _compiler_version(platform: str) -> dict:
  name = "libtpu" if platform == "tpu" else "jax-cuda12-plugin"
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return {name: metadata.version(name)}
  except Exception:  # pylint: disable=broad-except
    return {name: None}


def _reporter(emit):
  """emit plus a human line on stderr, for records compiled for the target only: the host's own
  backend is the CPU, so a TPU VM's chips or a GPU host's GPUs (or their absence) play no part."""
  jax.config.update("jax_platforms", "cpu")

  def report(record):
    emit(record)
    print(human_line(record), file=sys.stderr, flush=True)
  return report


def main(emit, **flags) -> None:
  """bench.py's `aot`: run()'s records through `emit`, a human line per step on stderr."""
  report = _reporter(emit)
  for record in run(**flags):
    report(record)


def main_fit(emit, **flags) -> None:
  """bench.py's `fit`: fit_table's compiles through `emit`, a human line each on stderr, and the
  table at the end of stderr."""
  table = fit_table(emit=_reporter(emit), **flags)
  print(f"\n{table}", file=sys.stderr, flush=True)
