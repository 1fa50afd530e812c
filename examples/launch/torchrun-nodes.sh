#!/usr/bin/env bash
# A DDP job on N nodes with dalishare: run this on every node, with NODE_RANK (0..N-1), NNODES and
# MASTER_ADDR (node 0's address) set. It starts this node's producer first (its shard of every
# epoch: --shard auto reads NODE_RANK/NNODES), then the node's ranks, which form one consumer group
# on it; the producer stops once they have read --epochs.
set -euo pipefail
: "${NODE_RANK:?}" "${NNODES:?}" "${MASTER_ADDR:?}"
DATA=${DATA:-/datasets/imagenet/train}
GPUS=${GPUS:-8}
EPOCHS=${EPOCHS:-90}

dalishare serve pipelines/resnet.py --data "$DATA" --device gpu --cache memory --shard auto \
    --name imnet --epochs "$EPOCHS" &
producer=$!
trap 'kill $producer 2>/dev/null || true' EXIT

torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
    --master-addr "$MASTER_ADDR" --master-port "${MASTER_PORT:-29500}" \
    examples/ddp_train.py --name imnet --epochs "$EPOCHS"
wait "$producer"
