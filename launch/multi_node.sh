#!/usr/bin/env bash
# usage: MASTER_ADDR=host0 NNODES=2 NODE_RANK=0 bash launch/multi_node.sh [--nproc N] [conf/x.yaml ...] [key=value ...]
# Multi-node training without SLURM: run the same command on every node, with NODE_RANK
# 0..NNODES-1. The torchrun agents meet in one c10d rendezvous at MASTER_ADDR:MASTER_PORT,
# hosted by node 0; one process per GPU on each node (default: every visible GPU, else 1).
#   MASTER_ADDR     address of node 0 that every node can reach (required)
#   NNODES          number of nodes (required)
#   NODE_RANK       this node's index; 0 hosts the rendezvous (required)
#   MASTER_PORT     rendezvous port on node 0 (default 29400)
#   RDZV_ID         the same id on all nodes of one job (default: asc-MASTER_ADDR-MASTER_PORT)
#   ASC_NPROC_PER_NODE=N or --nproc N; ASC_PYTHON; ASC_NET_IFNAME (NCCL/Gloo interface, see launch/lib.sh)
# Every node must see the repository, the venv, the shards and the run dir at the same paths.
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0; fi
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [ "${1:-}" = "--nproc" ]; then
  [ $# -ge 2 ] || { echo "error: --nproc needs a number" >&2; exit 2; }
  ASC_NPROC_PER_NODE=$2; shift 2
fi
for v in MASTER_ADDR NNODES NODE_RANK; do
  [ -n "${!v:-}" ] || { echo "error: $v is not set (see: bash $0 --help)" >&2; exit 2; }
done
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || { echo "error: NNODES='$NNODES' is not a positive number" >&2; exit 2; }
[[ $NODE_RANK =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
  || { echo "error: NODE_RANK='$NODE_RANK' must be 0..$((NNODES - 1))" >&2; exit 2; }
MASTER_PORT=${MASTER_PORT:-29400}
RDZV_ID=${RDZV_ID:-asc-$MASTER_ADDR-$MASTER_PORT}
PY=$(asc_python) || exit 1
NPROC=$(asc_nproc_per_node) || exit 1
asc_network_env
cd "$ASC_ROOT"
is_host=false; [ "$NODE_RANK" = 0 ] && is_host=true
echo "[multi_node] node $NODE_RANK/$NNODES, $NPROC process(es), rendezvous $MASTER_ADDR:$MASTER_PORT (host: $is_host)" >&2
exec "$PY" -m asc_dist.torchrun --nproc "$NPROC" --nnodes "$NNODES" --rdzv-id "$RDZV_ID" \
  --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-host "$is_host" -- "$@"
