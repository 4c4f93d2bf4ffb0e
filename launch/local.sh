#!/usr/bin/env bash
# One host, several ranks (one per GPU, or CPU ranks): launch/local.sh CONFIG NPROC [--set k=v ...] [--overwrite]
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 CONFIG NPROC [nvfp4_pp.run args...]" >&2; exit 2; fi
config=$1; nproc=$2; shift 2
exec torchrun --standalone --nproc-per-node "$nproc" -m nvfp4_pp.run "$config" "$@"
