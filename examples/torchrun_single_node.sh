#!/usr/bin/env bash
# DINO-family pretraining on one machine with several GPUs (or CPU processes), one process each.
#
#   examples/torchrun_single_node.sh --config vit_small_imagenet data.path=/data/imagenet/train
#   NPROC=2 ACCELERATOR=cpu examples/torchrun_single_node.sh --config demo trainer.max_steps=2
#   STRATEGY=fsdp NPROC=8 examples/torchrun_single_node.sh --config vit_small_imagenet   # FSDP2
#
# torchrun sets RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE, MASTER_ADDR/PORT; `dinokit train`
# takes trainer.devices / trainer.num_nodes from them when they are auto / 1 (as this script sets
# them) and Lightning joins the process group. data.batch_size is per process: the global batch
# is NPROC x data.batch_size (the lr scaling rule uses the global batch).
set -euo pipefail
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
NPROC=${NPROC:-1}
[ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1
ACCELERATOR=${ACCELERATOR:-auto}
DINOKIT=${DINOKIT:-$(command -v dinokit)}
TORCHRUN=${TORCHRUN:-torchrun}
exec $TORCHRUN --standalone --nproc_per_node="$NPROC" --no-python "$DINOKIT" train "$@" \
    trainer.accelerator="$ACCELERATOR" trainer.strategy="${STRATEGY:-ddp}" trainer.devices=auto trainer.num_nodes=1
