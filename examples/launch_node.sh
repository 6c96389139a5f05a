#!/usr/bin/env bash
# One "node" of a multi-node job: a torchrun agent joining a c10d rendezvous.
# Used as is by docker/compose.yaml (one container per node) and by
# tests/multinode/test_multinode.py (two agents on loopback), so what is tested is what runs.
#
#   NNODES=2 NPROC=2 RDZV=host:29400 RUN_ID=job1 examples/launch_node.sh train_fsdp.py --ckpt s3://bucket/run --steps 40
#
# Environment: NNODES (default 1), NPROC (ranks per node, default 2), RDZV (rendezvous
# host:port, default 127.0.0.1:29400), RUN_ID (rendezvous id, default dist_ckpt), PYTHON.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
script="$1"; shift
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --nproc-per-node "${NPROC:-2}" \
  --rdzv-backend c10d --rdzv-endpoint "${RDZV:-127.0.0.1:29400}" --rdzv-id "${RUN_ID:-dist_ckpt}" \
  --max-restarts 0 \
  "$here/$script" "$@"
