#!/usr/bin/env bash
# Several hosts without SLURM: run the same command on every node.
#   launch/multinode.sh CONFIG NNODES RDZV_HOST[:PORT] [nvfp4_pp.run args...]
# Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface that joins the nodes. Set LOCAL_ADDR
# to this node's address on that network when other nodes cannot resolve its hostname (Ubuntu maps
# the hostname to 127.0.1.1, for one). NPROC_PER_NODE: ranks per node (GPUs), default 1.
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 CONFIG NNODES RDZV_HOST[:PORT] [nvfp4_pp.run args...]" >&2; exit 2; fi
config=$1; nnodes=$2; endpoint=$3; shift 3
case "$endpoint" in *:*) ;; *) endpoint="$endpoint:29500" ;; esac
exec torchrun --nnodes "$nnodes" --nproc-per-node "${NPROC_PER_NODE:-1}" \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "${RDZV_ID:-nvfp4_pp}" \
    ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} \
    -m nvfp4_pp.run "$config" "$@"
