#!/usr/bin/env bash
# One CUDA host with any number of GPUs: a single process sees all of them and the code splits
# each batch across every local device (data parallel).
#
#   launch/gpu_host.sh setup                    # venv in $VENV (.venv), pip install -U 'jax[cuda12]' -e .
#   launch/gpu_host.sh run    [CONFIG] [WORKDIR] [--config.train.steps=100 ...]
#   launch/gpu_host.sh sweep  [CONFIG] [WORKDIR] [--sweep=prune.ratios=0,0.5:0,0.5:0,0.5 ...]
#   launch/gpu_host.sh report [WORKDIR]
#
# CUDA_VISIBLE_DEVICES=0,1 restricts the GPUs. Output is also appended to WORKDIR/launch.log.
# Re-running the same command resumes (finished runs are skipped, interrupted ones continue
# from their checkpoint).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
export BLOCKPRUNE_DISTRIBUTED=0  # one process per host: nothing to join

launch() {  # launch MODULE [CONFIG] [WORKDIR] [extra flags...]
  local module=$1 config=${2:-configs/base.py} workdir=${3:-runs/gpu}
  shift $(( $# < 3 ? $# : 3 ))
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  mkdir -p "$workdir"
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
  python -m "blockprune_jax.$module" --config="$config" --workdir="$workdir" "$@" \
    2>&1 | tee -a "$workdir/launch.log"
}

case "${1:-help}" in
  setup)
    [[ -x "$VENV/bin/pip" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -U pip
    "$VENV/bin/pip" install -U 'jax[cuda12]' -e .
    "$VENV/bin/python" -c 'import jax; print(jax.default_backend(), jax.devices())'
    ;;
  run)    shift; launch main "$@" ;;
  sweep)  shift; launch sweep "$@" ;;
  report)
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    python -m blockprune_jax.report "${2:-runs/gpu}"
    ;;
  *) sed -n '2,14p' "$0"; exit 1 ;;
esac
