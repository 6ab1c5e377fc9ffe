#!/usr/bin/env bash
# DINO-family pretraining on NNODES machines x GPUS GPUs. Run the same command on every node,
# with NODE_RANK = 0 .. NNODES-1 and MASTER = the host name of node 0 (reachable from all):
#
#   NNODES=2 NODE_RANK=0 MASTER=node0 GPUS=8 examples/torchrun_multi_node.sh \
#       --config vit_small_imagenet data.path=/data/imagenet/train trainer.run_name=vits16
#   NNODES=2 NODE_RANK=1 MASTER=node0 GPUS=8 examples/torchrun_multi_node.sh  (same arguments)
#
# The global batch is NNODES x GPUS x data.batch_size. The run directory (trainer.output_dir)
# must be on a file system every node sees; rank 0 writes the checkpoints.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER:?set MASTER (host of node 0)}"
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
PORT=${PORT:-29500}
DINOKIT=${DINOKIT:-$(command -v dinokit)}
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER:$PORT" --rdzv_id="${RDZV_ID:-dinokit}" \
    --no-python "$DINOKIT" train "$@" \
    trainer.accelerator=gpu trainer.strategy=ddp trainer.devices=auto trainer.num_nodes=1  # from the env
