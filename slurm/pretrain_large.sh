#!/bin/bash
# shellcheck source-path=SCRIPTDIR
# BERT-large ScTD pretraining on a SLURM cluster, in two phases:
#   phase 1: sequence length 128 up to step TRAIN_ITERS - PHASE2_ITERS   (SAVE_DIR/phase1)
#   phase 2: sequence length 512 up to step TRAIN_ITERS, starting from phase 1's final checkpoint
#            (SAVE_DIR/phase2; --load SAVE_DIR/phase1 until phase 2 has a checkpoint of its own)
#
#   sbatch slurm/pretrain_large.sh [extra sctd_dist/train.py flags, given to both phases]
#
# Phase 2 is a resume of phase 1 with a longer sequence on other data: weights, Adam moments, the
# token-importance table and the step counter carry over; the phase-2 data starts at its first
# sample (a data_switch event in phase2's metrics.jsonl). Both phases run one LR schedule over TRAIN_ITERS steps
# (--lr-decay-iters): warmup, then a linear decay that phase 1 leaves at PHASE2_ITERS/TRAIN_ITERS
# of the peak and phase 2 continues to 0.
# One requeue-safe job runs both phases; a requeue skips whatever is complete.
#
# Two-phase mixture recipe (today's encoders): phase 1 at 128 tokens on a web+books blend at the
# constant peak rate, phase 2 at 512 tokens on another blend, decaying (warmup-stable-decay):
#   DATA_PATH="0.7 /data/web-s128 0.3 /data/books-s128" \
#   PHASE2_DATA_PATH="0.5 /data/web-s512 0.3 /data/books-s512 0.2 /data/code-s512" \
#   LR_SCHEDULE=wsd EXTRA_ARGS="--mlm-probability 0.3" sbatch slurm/pretrain_large.sh
# Every folder of both blends must be prepared with one tokenizer (prepare --tokenizer DIR).
#
#SBATCH --job-name=sctd-bert-large
#SBATCH --nodes=4
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
# file (bash slurm/pretrain_large.sh inside salloc), then in the folder sbatch was called from.
for SCTD_ROOT in "${SCTD_ROOT:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" "$PWD" ""; do
    [[ -n $SCTD_ROOT && -f $SCTD_ROOT/slurm/common.sh ]] && break
done
[[ -n $SCTD_ROOT ]] || { echo "cannot find slurm/common.sh: set SCTD_ROOT to the sctd-dist checkout" >&2; exit 1; }
SCTD_ROOT=$(cd "$SCTD_ROOT" && pwd)
# shellcheck source=common.sh
source "$SCTD_ROOT/slurm/common.sh"

# BERT-large, 1M steps of 256 sequences: 90% at 128 tokens, 10% at 512 (the BERT paper's recipe).
MODEL=${MODEL:-large}
TRAIN_ITERS=${TRAIN_ITERS:-1000000}  # the final step, phase 2 included
PHASE2_ITERS=${PHASE2_ITERS:-100000}  # 0: phase 1 only
LR_DECAY_ITERS=${LR_DECAY_ITERS:-$TRAIN_ITERS}  # one schedule across both phases
# wsd: warmup, the peak, then a decay over the last WSD_DECAY_ITERS steps (default: phase 2)
LR_SCHEDULE=${LR_SCHEDULE:-deepspeed}
WSD_DECAY_ITERS=${WSD_DECAY_ITERS:-$((PHASE2_ITERS > 0 ? PHASE2_ITERS : TRAIN_ITERS / 10))}
SEQ_LENGTH=${SEQ_LENGTH:-128}
PHASE2_SEQ_LENGTH=${PHASE2_SEQ_LENGTH:-512}
DS_CONFIG=${DS_CONFIG:-$SCTD_ROOT/ds_configs/zero2_bf16.json}
PHASE2_DS_CONFIG=${PHASE2_DS_CONFIG:-$DS_CONFIG}
# Shards prepared at SEQ_LENGTH (one folder or a blend "W1 DIR1 W2 DIR2 ..."); empty: the sample corpus
DATA_PATH=${DATA_PATH:-}
PHASE2_DATA_PATH=${PHASE2_DATA_PATH:-}  # shards prepared at PHASE2_SEQ_LENGTH (folder or blend)
# Per-GPU micro-batch caps (80 GB, bf16; ScTD steps hold the activations of two passes); the
# global batch (GLOBAL_BATCH_SIZE, 256) is the same in both phases, the rest is accumulation.
MAX_MICRO_BATCH=${MAX_MICRO_BATCH:-32}
PHASE2_MAX_MICRO_BATCH=${PHASE2_MAX_MICRO_BATCH:-16}
PHASE1_EXTRA_ARGS=${PHASE1_EXTRA_ARGS:-}
PHASE2_EXTRA_ARGS=${PHASE2_EXTRA_ARGS:-}
RUN_NAME=${RUN_NAME:-bert-large-sctd}
SAVE_DIR=${SAVE_DIR:-$SCTD_ROOT/runs/$RUN_NAME/checkpoints}
LOG_DIR=${LOG_DIR:-$SCTD_ROOT/runs/$RUN_NAME/logs}

PHASE1_ITERS=$((TRAIN_ITERS - PHASE2_ITERS))
((PHASE1_ITERS > 0 && PHASE2_ITERS >= 0)) || {
    echo "need 0 <= PHASE2_ITERS < TRAIN_ITERS (got $PHASE2_ITERS, $TRAIN_ITERS)" >&2
    exit 1
}

sctd_init
phase1_args=()
phase2_args=()
read -r -a phase1_args <<<"$PHASE1_EXTRA_ARGS"
read -r -a phase2_args <<<"$PHASE2_EXTRA_ARGS"
if [[ $LR_SCHEDULE == wsd ]]; then  # the same schedule in both phases: only the step moves on
    schedule=(--lr-schedule wsd --lr-decay-start "$((TRAIN_ITERS - WSD_DECAY_ITERS))"
        --lr-wsd-decay-iters "$WSD_DECAY_ITERS")
    phase1_args=("${schedule[@]}" ${phase1_args[@]+"${phase1_args[@]}"})
    phase2_args=("${schedule[@]}" ${phase2_args[@]+"${phase2_args[@]}"})
fi

sctd_train phase1 "$SAVE_DIR/phase1" "" "$PHASE1_ITERS" "$SEQ_LENGTH" "$DATA_PATH" "$DS_CONFIG" \
    "$MAX_MICRO_BATCH" ${phase1_args[@]+"${phase1_args[@]}"} "$@"
if [[ $SCTD_OUTCOME == finished || $SCTD_OUTCOME == dry-run ]] && ((PHASE2_ITERS > 0)); then
    # Start from phase 1's final checkpoint; once phase 2 has saved, resume from its own (--load
    # defaults to --save), or a requeue would go back to the end of phase 1.
    phase2_load=$SAVE_DIR/phase1
    if (($(sctd_latest_step "$SAVE_DIR/phase2") >= 0)); then
        phase2_load=""
    fi
    sctd_train phase2 "$SAVE_DIR/phase2" "$phase2_load" "$TRAIN_ITERS" "$PHASE2_SEQ_LENGTH" \
        "$PHASE2_DATA_PATH" "$PHASE2_DS_CONFIG" "$PHASE2_MAX_MICRO_BATCH" ${phase2_args[@]+"${phase2_args[@]}"} "$@"
fi
sctd_finish
