#!/usr/bin/env bash
# Cloud TPU VM (one host or a pod slice): create it, install this checkout on every worker, run
# blockprune_jax on all workers at once (one process per host; JAX sees every chip), copy the
# results back from worker 0, delete it.
#
#   export TPU_NAME=bp ZONE=us-central2-b ACCELERATOR_TYPE=v4-32   # (and PROJECT=..., SPOT=1)
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup                     # copy this checkout, venv, pip install -e . 'jax[tpu]'
#   launch/tpu_vm.sh run   [CONFIG] [WORKDIR] [--config.train.epochs=1 ...]
#     (models whose state outgrows a chip shard it: configs/finetune_xl.py sets mesh.fsdp=-1 and
#     train.remat=block; `python -m blockprune_jax.bench aot` checks the fit from any host)
#   launch/tpu_vm.sh sweep [CONFIG] [WORKDIR] [--sweep=prune.target=0.3,0.5 ...]
#   launch/tpu_vm.sh fetch [WORKDIR]           # scp worker 0's WORKDIR to ./WORKDIR
#   launch/tpu_vm.sh delete
#
# Re-running `run`/`sweep` resumes: finished runs are skipped, interrupted ones restart from their
# checkpoint. DETACH=1 starts the job under nohup (log in ~/blockprune_jax/WORKDIR.log on each
# worker), so a dropped ssh connection does not kill it. On a multi-host slice each worker writes
# to its own disk; results.json and the report are written by process 0, i.e. on worker 0.
set -euo pipefail

TPU_NAME=${TPU_NAME:-blockprune}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=blockprune_jax  # relative to the remote home directory
GCLOUD=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then LOCATION+=(--project="$PROJECT"); fi

ssh_all() { "${GCLOUD[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command="$1"; }

num_workers() {
  "${GCLOUD[@]}" describe "$TPU_NAME" "${LOCATION[@]}" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .
}

launch() {  # launch MODULE [CONFIG] [WORKDIR] [extra flags...]
  local module=$1 config=${2:-configs/base.py} workdir=${3:-runs/tpu}
  shift $(( $# < 3 ? $# : 3 ))
  local distributed=0 extra="" cmd py
  # jax.distributed.initialize() joins the hosts of a pod slice; one host needs nothing.
  if (( $(num_workers) > 1 )); then distributed=1; fi
  if (( $# )); then extra=$(printf ' %q' "$@"); fi  # quoted again for the remote shell
  cmd="cd ~/$REMOTE_DIR && source ~/bp-venv/bin/activate && mkdir -p $(printf '%q' "$(dirname "$workdir")")"
  cmd+=" && export BLOCKPRUNE_DISTRIBUTED=$distributed"
  py="python -m blockprune_jax.$module --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")$extra"
  if [[ "${DETACH:-0}" == 1 ]]; then
    ssh_all "$cmd && nohup $py > $(printf '%q' "$workdir.log") 2>&1 < /dev/null &"
    echo "started; follow with: ${GCLOUD[*]} ssh $TPU_NAME ${LOCATION[*]} --worker=0 --command='tail -f ~/$REMOTE_DIR/$workdir.log'"
  else
    ssh_all "$cmd && $py"
  fi
}

case "${1:-help}" in
  create)
    spot=(); if [[ "${SPOT:-0}" == 1 ]]; then spot=(--spot); fi
    "${GCLOUD[@]}" create "$TPU_NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${spot[@]}"
    ;;
  setup)
    # Ship the working tree (tracked + untracked, not ignored files: no runs/, no venv).
    cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
    tarball=$(mktemp --suffix=.tgz)
    git ls-files -co --exclude-standard -z | tar czf "$tarball" --null -T -
    "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:blockprune_jax.tgz" "${LOCATION[@]}" --worker=all
    rm -f "$tarball"
    # The TPU images ship Python 3.10; the project needs >= 3.11, so uv provides 3.12 + pip.
    ssh_all "set -e; mkdir -p ~/$REMOTE_DIR && tar xzf ~/blockprune_jax.tgz -C ~/$REMOTE_DIR
      command -v ~/.local/bin/uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
      [ -x ~/bp-venv/bin/pip ] || ~/.local/bin/uv venv --seed --python 3.12 ~/bp-venv
      cd ~/$REMOTE_DIR && ~/bp-venv/bin/pip install -q -U pip && ~/bp-venv/bin/pip install -e . 'jax[tpu]'
      ~/bp-venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    ;;
  run)    shift; launch main "$@" ;;
  sweep)  shift; launch sweep "$@" ;;
  fetch)
    workdir=${2:-runs/tpu}
    mkdir -p "$(dirname "$workdir")"
    "${GCLOUD[@]}" scp --recurse "$TPU_NAME:$REMOTE_DIR/$workdir" "$(dirname "$workdir")/" \
      "${LOCATION[@]}" --worker=0
    ;;
  delete) "${GCLOUD[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet ;;
  *) sed -n '2,20p' "$0"; exit 1 ;;
esac
