#!/usr/bin/env bash
# Measured figures on one accelerator in a single call: correctness first, then our eval / train
# / mask / compact speed and transformers' PyTorch GPT-2 timed on the same shapes.
#
#   launch/gpu_bench.sh OUTDIR [--tiny]
#
# Writes OUTDIR/figures.jsonl (one JSON line per figure: a meta record, check_logits and
# check_perplexity with pass, eval / eval_compact / compact_speedup / train / train_masked /
# mask_overhead from `blockprune_jax.bench all` (with mfu: model FLOPs / the GPU's peak, flops.py;
# aot: the same steps compiled ahead of time for BENCH_AOT_TOPOLOGY, h100:1 by default, whose
# total_bytes compare with program_memory_gb), side_by_side (per-run step cost of 3 runs as
# one program) and sweep (with batch_runs=3: the side-by-side ratio of a real sweep) from
# `blockprune_jax.bench`, torch_eval / torch_train from
# `blockprune_jax.bench.torch_ref` without and with torch.compile, a step_time per step, and
# {"bench": ..., "error": ...} for whatever failed), OUTDIR/logs/STEP.log and OUTDIR/summary.txt
# (the table printed at the end). Exit status 1 when a step failed or a check did not pass.
#
# Default: GPT-2 124M, 1024 tokens, bf16, train batch 16, eval batch 32, 20 timed steps; under
# 8 minutes on an H100 / H200. --tiny (or BENCH_TINY=1): a 2-layer float32 model, a 512-token
# vocabulary, few steps, whatever backend JAX finds (the CPU test), and torch.compile with its
# `eager` backend (inductor's C++ compilation takes ~20 s per graph on a CPU).
#
# Environment: PYTHON (python3), BENCH_BUDGET_S (whole run, 450; each step's timeout is cut to
# what is left, so one hung step cannot take the rest), BENCH_SITE (/tmp/site: where wheels
# carried in .whl/ are installed when the image lacks a dependency, e.g. ml-collections).
set -uo pipefail  # no -e: a failed step is recorded and the next one still runs

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 2; }

OUT="" TINY=${BENCH_TINY:-0}
for arg in "$@"; do
  case $arg in
    --tiny) TINY=1 ;;
    -h|--help) usage ;;
    -*) echo "unknown option $arg" >&2; usage ;;
    *) [[ -z $OUT ]] || usage; OUT=$arg ;;
  esac
done
[[ -n $OUT ]] || usage
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
BUDGET=${BENCH_BUDGET_S:-450}
SITE=${BENCH_SITE:-/tmp/site}
FIG=$OUT/figures.jsonl
[[ -f $FIG ]] && mv "$FIG" "$FIG.prev"  # a rerun starts a fresh file and keeps the last one
START_MS=$(date +%s%3N)
FAILED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1  # nothing here needs the network

if [[ $TINY == 1 ]]; then
  # float32: bf16 matmuls compile slower on a CPU; the checks above cover bf16 anyway.
  SHAPE=(--preset=tiny --seq_len=32 --batch=2 --eval_batch=4 --vocab_size=512 --dtype=float32)
  STEPS=(--steps=2 --warmup=1)
  COMPILE=(--compile_backend=eager)
  SWEEP=(--preset=tiny --seq_len=32 --batch=4 --vocab_size=257 --dtype=float32 --runs=3 --sweep_steps=4)
  T_CHECK=60 T_JAX=90 T_TORCH=90 T_SIDE=60 T_SWEEP=120
else
  SHAPE=(--preset=gpt2 --seq_len=1024 --batch=16 --eval_batch=32 --dtype=bfloat16)
  STEPS=(--steps=20 --warmup=3)
  COMPILE=()
  # Three pruned GPT-2 124M runs of 40 steps (655k tokens each), one after another and side by
  # side (sweep.batch_runs=3): the ratio the sweep engine exists for.
  SWEEP=(--preset=gpt2 --seq_len=1024 --batch=16 --vocab_size=50257 --dtype=bfloat16 --runs=3 --sweep_steps=40)
  T_CHECK=120 T_JAX=240 T_TORCH=300 T_SIDE=90 T_SWEEP=150
fi

elapsed_ms() { echo $(( $(date +%s%3N) - START_MS )); }

record() {  # record NAME SECONDS RC TIMEOUT: a step_time line, and an error line if RC != 0
  "$PY" - "$@" "$OUT/logs/$1.log" >> "$FIG" <<'EOF'
import json, os, sys
name, seconds, rc, limit, log = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
print(json.dumps({"bench": "step_time", "step": name, "seconds": seconds, "rc": rc,
                  "timeout_s": int(limit)}))
if rc:
  tail = open(log, errors="replace").read().strip().splitlines()[-3:] if os.path.exists(log) else []
  why = ("skipped: the time budget is spent" if limit == "0" else
         f"timed out after {limit} s" if rc in (124, 137) else f"exit status {rc}")
  print(json.dumps({"bench": name, "error": f"{why}: " + " | ".join(tail)[-800:]}))
EOF
}

step() {  # step NAME TIMEOUT_S CMD...: CMD under a timeout, output in logs/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed_ms) / 1000 - 10 ))  # 10 s kept for the summary
  if (( left < 5 )); then
    echo "[gpu_bench] $name skipped: the ${BUDGET} s budget is spent" | tee "$OUT/logs/$name.log"
    record "$name" 0 124 0; FAILED=1; return
  fi
  (( limit > left )) && limit=$left
  local t0
  t0=$(date +%s%3N)
  echo "[gpu_bench] $name (timeout ${limit} s): $*"
  # timeout signals the whole process group: torch.compile's worker processes end with the step.
  timeout -k 10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local secs
  secs=$(awk "BEGIN {printf \"%.1f\", ($(date +%s%3N) - $t0) / 1000}")
  echo "[gpu_bench] $name: exit $rc after $secs s"
  record "$name" "$secs" "$rc" "$limit"
  (( rc == 0 )) || FAILED=1
}

install_wheels() {  # only when the image lacks something our modules import
  # ml_collections stands for the carried wheels: the one the benches import (via train).
  if "$PY" -c 'import ml_collections' > /dev/null 2>&1; then
    echo "[gpu_bench] dependencies import: no install"
    return 0
  fi
  compgen -G ".whl/*.whl" > /dev/null || { echo "missing dependencies and no .whl/*.whl" >&2; return 1; }
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
    || return 1
  export PYTHONPATH="$SITE:$PYTHONPATH"
  "$PY" -c 'import blockprune_jax.bench, blockprune_jax.train'
}

meta() {
  local gpu commit
  gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
  commit=$(git rev-parse --short HEAD 2>/dev/null)
  "$PY" - "$TINY" "$BUDGET" "$gpu" "$commit" >> "$FIG" <<'EOF'
import datetime, json, platform, sys
tiny, budget, gpu, commit = sys.argv[1:5]
print(json.dumps({"bench": "meta", "tiny": tiny == "1", "budget_s": int(budget),
                  "gpu": gpu or None, "commit": commit or None, "host": platform.node(),
                  "python": platform.python_version(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
EOF
}

t0=$(date +%s%3N)
install_wheels > "$OUT/logs/install.log" 2>&1
rc=$?
record install "$(( ($(date +%s%3N) - t0) / 1000 ))" "$rc" 120
(( rc == 0 )) || FAILED=1
meta

# Correctness on the accelerator before any speed figure.
# Both frameworks share the device in this step: JAX must not take 75 % of its memory up front.
step check "$T_CHECK" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
  "$PY" -m blockprune_jax.bench.torch_ref check --json="$FIG"
# Ours: one process, JAX and the dense figures shared by mask and compact.
step jax_all "$T_JAX" "$PY" -m blockprune_jax.bench all "${SHAPE[@]}" "${STEPS[@]}" --json="$FIG"
# bench aot's memory figure of the same steps, for the AOT-vs-real comparison (not with --tiny:
# the CPU test has no CUDA plugin).
[[ $TINY == 1 ]] || step aot 120 "$PY" -m blockprune_jax.bench aot \
  --topology="${BENCH_AOT_TOPOLOGY:-h100:1}" "${SHAPE[@]}" --json="$FIG"
# One train / eval step of 3 runs side by side (vmap and lax.map) against one run alone.
step side_by_side "$T_SIDE" "$PY" -m blockprune_jax.bench side_by_side "${SHAPE[@]}" "${STEPS[@]}" \
  --runs=3 --json="$FIG"
# A sweep's cost beyond its steps, and the same runs side by side as one program.
step sweep "$T_SWEEP" "$PY" -m blockprune_jax.bench sweep "${SWEEP[@]}" --batch_runs=3 --json="$FIG"
# transformers' PyTorch GPT-2, same shapes: SDPA, then SDPA + torch.compile, one process (each
# figure is written when measured: a compilation that runs out of time loses only its own).
step torch "$T_TORCH" "$PY" -m blockprune_jax.bench.torch_ref all --impl=both "${SHAPE[@]}" \
  "${STEPS[@]}" "${COMPILE[@]}" --json="$FIG"

"$PY" -m blockprune_jax.bench.torch_ref summary "$FIG" | tee "$OUT/summary.txt"
echo "[gpu_bench] $(( $(elapsed_ms) / 1000 )) s in all; figures in $FIG"
exit "$FAILED"
