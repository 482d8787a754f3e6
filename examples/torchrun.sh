#!/usr/bin/env bash
# dilatedseg with torchrun: DDP on one node, or on several (run this script on every node).
#
#   examples/torchrun.sh                                    # one node, all its GPUs
#   DATASET=voc STAGE=context examples/torchrun.sh          # another dataset / stage
#   NPROC=2 ARGS="--trainer.max_epochs=1" examples/torchrun.sh   # CPU-only machine: 2 processes
#   # two nodes, 4 GPUs each: the same command on both, MASTER = a host:port of the first node
#   NNODES=2 NPROC=4 MASTER=node0:29500 JOB_ID=exp42 examples/torchrun.sh
#   # torchrun waits JOIN_TIMEOUT seconds (default 600) for all nodes, then fails with a
#   # RendezvousTimeoutError: start the script on every node within that time.
#
# All processes write into runs/<dataset>/<stage>/torchrun-<run id>/ (files by rank 0 only);
# the run id is JOB_ID across nodes, a fresh one on a single node. data.batch_size is per
# process: the effective batch is batch_size x NPROC x NNODES.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET=${DATASET:-shapes}
STAGE=${STAGE:-frontend}
NNODES=${NNODES:-1}
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "${GPUS}" -gt 0 ]; then ACCELERATOR=gpu; else ACCELERATOR=cpu; fi
NPROC=${NPROC:-$(( GPUS > 0 ? GPUS : 1 ))}

CONFIGS=(--config "conf/${DATASET}.yaml" --config "conf/stage/${STAGE}.yaml")
if [ -f "conf/${DATASET}/${STAGE}.yaml" ]; then
  CONFIGS+=(--config "conf/${DATASET}/${STAGE}.yaml")
fi

if [ "${NNODES}" -gt 1 ]; then
  : "${MASTER:?set MASTER=host:port of the first node}" "${JOB_ID:?set JOB_ID, the same on every node}"
  RENDEZVOUS=(--nnodes="${NNODES}" --rdzv-backend=c10d --rdzv-endpoint="${MASTER}"
              --rdzv-id="${JOB_ID}" --rdzv-conf="join_timeout=${JOIN_TIMEOUT:-600}")
else
  RENDEZVOUS=(--standalone)
fi

export NO_ALBUMENTATIONS_UPDATE=1
# shellcheck disable=SC2086  # ARGS holds several arguments
exec torchrun "${RENDEZVOUS[@]}" --nproc-per-node="${NPROC}" -m dilatedseg fit \
  "${CONFIGS[@]}" \
  --trainer.accelerator="${ACCELERATOR}" \
  --trainer.devices="${NPROC}" \
  --trainer.num_nodes="${NNODES}" \
  --trainer.strategy=ddp \
  ${ARGS:-}
