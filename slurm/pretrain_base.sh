#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# BERT-base ScTD pretraining on a SLURM cluster.
#
#   sbatch slurm/pretrain_base.sh [extra sctd_dist/train.py flags]
#
# Submit from the repository root (sbatch runs a copy of this file, so the checkout is found
# through SCTD_ROOT, else the submit folder). Settings come from the environment; see
# slurm/common.sh and the README ("Running on a SLURM cluster"). Restart = submit the same command:
# training resumes from the newest checkpoint in SAVE_DIR.
#
#SBATCH --job-name=sctd-bert-base
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs this script from a spool folder: look for the checkout in SCTD_ROOT, next to this
# file (bash slurm/pretrain_base.sh inside salloc), then in the folder sbatch was called from.
for SCTD_ROOT in "${SCTD_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" "$PWD" ""; do
    [[ -n $SCTD_ROOT && -f $SCTD_ROOT/slurm/common.sh ]] && break
done
[[ -n $SCTD_ROOT ]] || { echo "cannot find slurm/common.sh: set SCTD_ROOT to the sctd-dist checkout" >&2; exit 1; }
SCTD_ROOT=$(cd "$SCTD_ROOT" && pwd)
# shellcheck source=common.sh
source "$SCTD_ROOT/slurm/common.sh"

# BERT-base, 1M steps of 256 x 128 tokens (the BERT paper's budget at sequence length 128).
MODEL=${MODEL:-base}
TRAIN_ITERS=${TRAIN_ITERS:-1000000}
SEQ_LENGTH=${SEQ_LENGTH:-128}
DS_CONFIG=${DS_CONFIG:-$SCTD_ROOT/ds_configs/zero2_bf16.json}
DATA_PATH=${DATA_PATH:-}  # prepared shards (python -m sctd_dist.data.prepare); empty: the sample corpus
RUN_NAME=${RUN_NAME:-bert-base-sctd}
SAVE_DIR=${SAVE_DIR:-$SCTD_ROOT/runs/$RUN_NAME/checkpoints}
LOG_DIR=${LOG_DIR:-$SCTD_ROOT/runs/$RUN_NAME/logs}
LOAD_DIR=${LOAD_DIR:-}  # empty: resume from SAVE_DIR
MAX_MICRO_BATCH=${MAX_MICRO_BATCH:-64}  # per GPU (80 GB, bf16, 128 tokens); more goes to accumulation

sctd_init
sctd_train train "$SAVE_DIR" "$LOAD_DIR" "$TRAIN_ITERS" "$SEQ_LENGTH" "$DATA_PATH" "$DS_CONFIG" \
    "$MAX_MICRO_BATCH" "$@"
sctd_finish
