# shellcheck shell=bash
# Shared by slurm/pretrain_base.sh and slurm/pretrain_large.sh; sourced, never run on its own.
#
# How a job runs
#   LAUNCHER=torchrun (default): one srun task per node; each task is torchrun, which starts
#     GPUS_PER_NODE workers and meets the other nodes through a c10d rendezvous hosted on the first
#     node of the job (MASTER_ADDR:MASTER_PORT). No ssh, no hostfile, no MPI needed.
#   LAUNCHER=srun: one srun task per GPU running sctd_dist/train.py directly; train.py maps
#     SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID itself. Submit with --ntasks-per-node=GPUS_PER_NODE.
#   The deepspeed launcher is not offered here: its pdsh backend needs ssh between nodes and nothing
#   forwards SIGUSR1 to the workers it starts. To use it anyway, from the batch script:
#     scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=$GPUS_PER_NODE/" >hostfile
#     deepspeed --hostfile hostfile --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
#         sctd_dist/train.py --deepspeed_config ... (same flags as below)
#   and deliver preemption signals yourself (e.g. srun --overlap --ntasks-per-node=1
#   pkill -USR1 -f sctd_dist/train.py).
#
# Preemption and requeue
#   `#SBATCH --signal=B:USR1@180` makes SLURM send SIGUSR1 to this batch shell only, 180 s before the
#   time limit. The trap below forwards it to the running srun; srun forwards signals to its tasks;
#   torchrun forwards it to its workers because we list SIGUSR1 in --signals-to-handle (torchrun
#   leaves SIGUSR1 alone by default, and an unhandled SIGUSR1 would kill it). The workers save a
#   checkpoint at the next step boundary and exit 0 (sctd_dist/preemption.py); torchrun itself then
#   exits non-zero with a SignalException traceback, which is expected: the outcome is judged from
#   the checkpoint pointer and metrics.jsonl, not from exit codes. The script then asks
#   SLURM to requeue the job, unless training has reached its last step. The requeued job runs this
#   script again (same job id, SLURM_RESTART_COUNT + 1) and train.py resumes from the newest
#   checkpoint in --save. SIGTERM (time limit, preemption by a higher-priority job, scancel) goes from
#   SLURM to every process of the job directly (torchrun forwards it too); it also ends in a
#   checkpoint if the save fits in SLURM's KillWait, but we do not requeue after it: SLURM's own
#   preemption policy decides, and a user's scancel stays a cancel.
#
# DRY_RUN=1 prints the srun command of each phase instead of running it (inside an allocation).
#
# Every setting below can be overridden from the environment (sbatch exports it by default), e.g.
#   NODES=4 GPUS_PER_NODE=8 DATA_PATH=/data/wiki-s128 sbatch --nodes=4 slurm/pretrain_base.sh

sctd_log() {
    local line
    printf -v line '[sctd %(%Y-%m-%d %H:%M:%S)T] %s' -1 "$*"
    printf '%s\n' "$line" >&2
    if [[ -n ${RUN_DIR:-} && -d ${RUN_DIR:-} ]]; then
        printf '%s\n' "$line" >>"$RUN_DIR/events.log"
    fi
}

sctd_die() {
    sctd_log "error: $*"
    exit 1
}

# Step of the newest complete checkpoint in $1 (train.py's `latest` pointer), or -1.
sctd_latest_step() {
    local tag=""
    if [[ -f $1/latest ]]; then
        tag=$(<"$1/latest")
    fi
    if [[ $tag =~ ^global_step([0-9]+)$ ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo -1
    fi
}

# Appends one bind mount "P:P" per path to the comma-separated list in SCTD_MOUNTS, skipping paths
# that an earlier mount already covers.
_sctd_add_mount() {
    local path=$1 prev
    [[ -n $path && -e $path ]] || return 0
    path=$(cd "$path" 2>/dev/null && pwd || echo "$path")
    local IFS=,
    for prev in $SCTD_MOUNTS; do
        prev=${prev%%:*}
        [[ $path == "$prev" || $path == "$prev"/* ]] && return 0
    done
    SCTD_MOUNTS=${SCTD_MOUNTS:+$SCTD_MOUNTS,}$path:$path
}

sctd_init() {
    # First, so that no signal is lost (bash's default for SIGUSR1 would end the job script).
    SCTD_SIGNALS=""  # stop signals this batch shell received, in order
    SCTD_CHILD=""    # pid of the running srun
    SCTD_OUTCOME=""  # finished | stopped | failed | dry-run, of the last phase
    SCTD_RC=0
    trap 'sctd_on_signal USR1' USR1
    trap 'sctd_on_signal TERM' TERM

    [[ -n ${SLURM_JOB_ID:-} ]] || sctd_die "not inside a SLURM job: submit with sbatch (or salloc, then bash $0)"
    : "${SCTD_ROOT:?set by the calling script}"

    # What to train (the calling script sets MODEL, TRAIN_ITERS, SEQ_LENGTH, DS_CONFIG, SAVE_DIR,
    # LOG_DIR defaults first).
    TP=${TP:-1}
    SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-$([[ $TP -gt 1 ]] && echo 1 || echo 0)}
    TOKEN_DROP=${TOKEN_DROP:-sctd}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}  # sequences per optimizer step (the BERT recipe)
    MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-}  # per GPU; empty: derived (sctd_micro_batch)
    SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
    KEEP_LAST=${KEEP_LAST:-3}
    EVAL_INTERVAL=${EVAL_INTERVAL:-2000}
    EVAL_ITERS=${EVAL_ITERS:-20}
    SEED=${SEED:-1234}
    LR_DECAY_ITERS=${LR_DECAY_ITERS:-}  # LR schedule length; empty: each phase's own final step
    DATA_CACHE=${DATA_CACHE:-$SCTD_ROOT/data_cache}
    EXTRA_ARGS=${EXTRA_ARGS:-}
    MAX_REQUEUES=${MAX_REQUEUES:-100}

    # Where and how it runs.
    LAUNCHER=${LAUNCHER:-torchrun}
    NODES=${NODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    SRUN_ARGS=${SRUN_ARGS:-}
    TORCHRUN_ARGS=${TORCHRUN_ARGS:-}
    # Seconds torchrun lets workers finish their checkpoint after a stop signal before SIGKILL.
    SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-170}
    TRAIN_SCRIPT=${TRAIN_SCRIPT:-$SCTD_ROOT/sctd_dist/train.py}
    CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
    APPTAINER_IMAGE=${APPTAINER_IMAGE:-}
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -z $CONTAINER_IMAGE && -z $APPTAINER_IMAGE && -x $SCTD_ROOT/.venv/bin/python ]]; then
            PYTHON=$SCTD_ROOT/.venv/bin/python  # the checkout's venv (make setup)
        else
            PYTHON=python3
        fi
    fi
    case $LAUNCHER in
        torchrun | srun) ;;
        *) sctd_die "LAUNCHER must be torchrun or srun, got '$LAUNCHER'" ;;
    esac

    # Rendezvous: first host of the allocation, a port derived from the job id (the same rule as
    # sctd_dist/parallel/launch_env.py) so that jobs sharing a node do not collide.
    local hosts
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || sctd_die "scontrol show hostnames failed"
    SCTD_HOSTS=()
    read -r -d '' -a SCTD_HOSTS <<<"$hosts" || true
    ((${#SCTD_HOSTS[@]} > 0)) || sctd_die "no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    export MASTER_ADDR=${MASTER_ADDR:-${SCTD_HOSTS[0]}}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # Launchers set these per worker; stale values from the submitting shell would win over SLURM's.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE

    # NCCL: turn a failed or hung collective into a process exit (and so a failed step that srun
    # --kill-on-bad-exit tears down) instead of a job that hangs until its time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_ENABLE_MONITORING=${TORCH_NCCL_ENABLE_MONITORING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export PYTHONUNBUFFERED=1
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

    # One folder per job (kept across requeues: the job id does not change).
    ATTEMPT=${SLURM_RESTART_COUNT:-0}
    RUN_DIR=$LOG_DIR/${SLURM_JOB_NAME:-sctd}-$SLURM_JOB_ID
    mkdir -p "$RUN_DIR" "$SAVE_DIR"
    printf '%s\n' "${SCTD_HOSTS[@]}" >"$RUN_DIR/nodes.attempt$ATTEMPT.txt"
    env | grep -E '^(SLURM|NCCL|TORCH|CUDA|MASTER|OMP|GLOO|UCX|FI|PET)_' | sort \
        >"$RUN_DIR/env.attempt$ATTEMPT.txt" || true

    # Containers: pyxis/enroot (srun --container-image) or Apptainer (apptainer exec per task).
    SCTD_MOUNTS=${CONTAINER_MOUNTS:-}
    if [[ -z ${CONTAINER_MOUNTS:-} ]]; then
        local p data_words=()
        # A data path may be a weighted blend "0.7 DIR_A 0.3 DIR_B": mount its folders.
        read -r -a data_words <<<"${DATA_PATH:-} ${PHASE2_DATA_PATH:-}"
        for p in "$SCTD_ROOT" "$PWD" "$LOG_DIR" "$SAVE_DIR" ${data_words[@]+"${data_words[@]}"} \
            "$DATA_CACHE"; do
            [[ $p =~ ^[0-9.eE+-]+$ ]] || _sctd_add_mount "$p"  # weights are no folders
        done
    fi
    SCTD_SRUN_CONTAINER=()
    SCTD_TASK_PREFIX=()
    if [[ -n $CONTAINER_IMAGE ]]; then
        SCTD_SRUN_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-mounts="$SCTD_MOUNTS"
            --container-workdir="$PWD")
    elif [[ -n $APPTAINER_IMAGE ]]; then
        SCTD_TASK_PREFIX=(apptainer exec --nv --bind "$SCTD_MOUNTS" --pwd "$PWD" "$APPTAINER_IMAGE")
    fi

    sctd_log "job $SLURM_JOB_ID attempt $ATTEMPT: $NODES node(s) x $GPUS_PER_NODE, launcher $LAUNCHER," \
        "rendezvous $MASTER_ADDR:$MASTER_PORT, run folder $RUN_DIR"
}

# SIGUSR1 (--signal=B:...) reaches only this shell: forward it. SIGTERM is only recorded: whenever
# SLURM sends it to the batch shell (time limit, preemption, scancel) it also sends it to every step
# itself, and a second copy reaching torchrun while it waits for its workers to save would make it
# give up and SIGKILL them.
sctd_on_signal() {
    SCTD_SIGNALS+="$1 "
    if [[ $1 != USR1 ]]; then
        sctd_log "received SIG$1 (SLURM signals the training step itself); waiting for it to save"
        return 0
    fi
    sctd_log "received SIG$1: forwarding it to the training step (it saves at the next step boundary)"
    if [[ -n $SCTD_CHILD ]]; then
        kill -s "$1" "$SCTD_CHILD" 2>/dev/null || true
    fi
}

# Sets SCTD_MICRO: MICRO_BATCH_SIZE when given, else the largest micro-batch of at most $2 that
# splits GLOBAL_BATCH_SIZE ($1) over the data-parallel ranks in whole accumulation steps, so that
# the defaults work on any number of nodes.
sctd_micro_batch() {
    local global=$1 cap=$2 dp per accum
    if [[ -n ${MICRO_BATCH_SIZE:-} ]]; then
        SCTD_MICRO=$MICRO_BATCH_SIZE
        return 0
    fi
    dp=$((NODES * GPUS_PER_NODE / TP))
    ((dp > 0 && global % dp == 0)) ||
        sctd_die "GLOBAL_BATCH_SIZE $global is not a multiple of the data-parallel size $dp"
    per=$((global / dp))
    for ((accum = 1; accum <= per; accum++)); do
        if ((per % accum == 0 && per / accum <= cap)); then
            SCTD_MICRO=$((per / accum))
            return 0
        fi
    done
}

# sctd_train NAME SAVE LOAD ITERS SEQ DATA DS_CONFIG MAX_MICRO [train.py flags...]
# Runs (or resumes) one training phase up to step ITERS. Sets SCTD_OUTCOME:
#   finished  the newest checkpoint in SAVE is at step ITERS (also when it already was);
#   stopped   training saved and exited because of a signal (its "preempted" event, or a newer
#             checkpoint after a signal);
#   failed    anything else (SCTD_RC holds srun's status);
#   dry-run   DRY_RUN=1: the command was only printed.
sctd_train() {
    local name=$1 save=$2 load=$3 iters=$4 seq=$5 data=$6 ds=$7 max_micro=$8
    shift 8
    local dir=$RUN_DIR/$name step
    mkdir -p "$dir" "$save"
    step=$(sctd_latest_step "$save")
    if ((step >= iters)); then
        sctd_log "$name: already complete (checkpoint at step $step of $iters)"
        SCTD_OUTCOME=finished
        return 0
    fi
    if [[ -n $SCTD_SIGNALS ]]; then  # stopped before this phase began
        SCTD_OUTCOME=stopped
        return 0
    fi
    [[ -f $ds ]] || sctd_die "DeepSpeed config $ds not found"
    cp "$ds" "$dir/ds_config.json"
    sctd_micro_batch "$GLOBAL_BATCH_SIZE" "$max_micro"

    local args=(--deepspeed_config "$dir/ds_config.json" --model "$MODEL" --seq-length "$seq"
        --tensor-model-parallel-size "$TP" --token-drop "$TOKEN_DROP" --train-iters "$iters"
        --save "$save" --save-interval "$SAVE_INTERVAL" --keep-last "$KEEP_LAST"
        --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-dir "$dir"
        --global-batch-size "$GLOBAL_BATCH_SIZE" --micro-batch-size "$SCTD_MICRO"
        --seed "$SEED" --data-cache "$DATA_CACHE" --no-progress)
    local data_args=()
    read -r -a data_args <<<"$data"  # one folder, or "W1 DIR1 W2 DIR2 ..." (no spaces in folders)
    if ((${#data_args[@]})); then args+=(--data-path "${data_args[@]}"); fi
    if [[ -n $load ]]; then args+=(--load "$load"); fi
    if [[ -n $LR_DECAY_ITERS ]]; then args+=(--lr-decay-iters "$LR_DECAY_ITERS"); fi
    if [[ $SEQUENCE_PARALLEL == 1 ]]; then args+=(--sequence-parallel); fi
    local extra=()
    read -r -a extra <<<"$EXTRA_ARGS"  # whitespace-separated, no quoting
    args+=(${extra[@]+"${extra[@]}"} "$@")

    local srun_extra=() torchrun_extra=() cmd=()
    local signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1  # torchrun forwards these to its workers
    read -r -a srun_extra <<<"$SRUN_ARGS"
    read -r -a torchrun_extra <<<"$TORCHRUN_ARGS"
    if [[ $LAUNCHER == torchrun ]]; then
        cmd=(srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1
            ${SCTD_SRUN_CONTAINER[@]+"${SCTD_SRUN_CONTAINER[@]}"} ${srun_extra[@]+"${srun_extra[@]}"}
            ${SCTD_TASK_PREFIX[@]+"${SCTD_TASK_PREFIX[@]}"}
            "$PYTHON" -m torch.distributed.run --nnodes="$NODES" --nproc_per_node="$GPUS_PER_NODE"
            --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
            --max_restarts=0 --signals_to_handle="$signals"
            --shutdown_timeout="$SHUTDOWN_TIMEOUT" ${torchrun_extra[@]+"${torchrun_extra[@]}"}
            "$TRAIN_SCRIPT" "${args[@]}")
    else
        cmd=(srun --nodes="$NODES" --ntasks="$((NODES * GPUS_PER_NODE))" --ntasks-per-node="$GPUS_PER_NODE"
            --kill-on-bad-exit=1
            ${SCTD_SRUN_CONTAINER[@]+"${SCTD_SRUN_CONTAINER[@]}"} ${srun_extra[@]+"${srun_extra[@]}"}
            ${SCTD_TASK_PREFIX[@]+"${SCTD_TASK_PREFIX[@]}"}
            "$PYTHON" -u "$TRAIN_SCRIPT" "${args[@]}")
    fi
    {
        printf '# %s attempt %s, %(%Y-%m-%d %H:%M:%S)T, MASTER_ADDR=%s MASTER_PORT=%s\n' \
            "$name" "$ATTEMPT" -1 "$MASTER_ADDR" "$MASTER_PORT"
        printf '%q ' "${cmd[@]}"
        printf '\n'
    } >>"$dir/command.sh"

    if [[ ${DRY_RUN:-0} == 1 ]]; then
        sctd_log "$name: DRY_RUN=1, would run: $(printf '%q ' "${cmd[@]}")"
        SCTD_OUTCOME=dry-run
        return 0
    fi
    local before=0
    if [[ -f $dir/metrics.jsonl ]]; then before=$(wc -l <"$dir/metrics.jsonl"); fi
    local from="from scratch"
    if ((step >= 0)); then
        from="resuming from step $step"
    elif [[ -n $load ]]; then
        from="starting from the newest checkpoint in $load"
    fi
    sctd_log "$name: training to step $iters, $from; output in $dir/train.log"
    # In the background so that the traps run while training does (bash defers traps until the
    # foreground command returns); tee keeps the output in the SLURM log and in the run folder.
    "${cmd[@]}" > >(tee -a "$dir/train.log") 2>&1 &
    SCTD_CHILD=$!
    if [[ " $SCTD_SIGNALS" == *" USR1 "* ]]; then  # it arrived while srun was being started
        kill -s USR1 "$SCTD_CHILD" 2>/dev/null || true
    fi
    local rc
    while :; do
        rc=0
        wait "$SCTD_CHILD" || rc=$?
        # A trapped signal cuts `wait` short with a status > 128 while srun still runs: wait again.
        if ((rc > 128)) && kill -0 "$SCTD_CHILD" 2>/dev/null; then continue; fi
        break
    done
    SCTD_CHILD=""
    SCTD_RC=$rc

    local start=$step
    step=$(sctd_latest_step "$save")
    if ((step >= iters)); then
        SCTD_OUTCOME=finished
    elif [[ -f $dir/metrics.jsonl ]] && tail -n +"$((before + 1))" "$dir/metrics.jsonl" |
        grep -q '"event": "preempted"'; then
        SCTD_OUTCOME=stopped
    elif [[ -n $SCTD_SIGNALS ]] && ((step > start)); then
        # Saved after the signal, but rank 0 was killed before it logged the event (with
        # --kill-on-bad-exit, torchrun's non-zero exit after a forwarded signal ends the step).
        SCTD_OUTCOME=stopped
    else
        SCTD_OUTCOME=failed
    fi
    sctd_log "$name: $SCTD_OUTCOME (srun exit $rc, newest checkpoint at step $step of $iters)"
}

# Ends the job: exit 0 when finished; requeue after SIGUSR1 (time limit ahead) when not finished.
sctd_finish() {
    if [[ $SCTD_OUTCOME == dry-run ]]; then
        exit 0
    fi
    if [[ $SCTD_OUTCOME == finished ]]; then
        sctd_log "training complete"
        exit 0
    fi
    if [[ " $SCTD_SIGNALS" == *" USR1 "* ]]; then
        if ((ATTEMPT >= MAX_REQUEUES)); then
            sctd_log "not requeueing: $ATTEMPT restarts already (MAX_REQUEUES=$MAX_REQUEUES)"
        else
            sctd_log "requeueing job $SLURM_JOB_ID; the next attempt resumes from the newest checkpoint"
            : >"$RUN_DIR/requeue.attempt$ATTEMPT"
            # Last action: SLURM ends this batch shell as it requeues the job.
            scontrol requeue "$SLURM_JOB_ID" ||
                sctd_log "scontrol requeue failed: submit the same command again to resume"
        fi
    fi
    if [[ $SCTD_OUTCOME == stopped ]]; then
        exit 0
    fi
    sctd_log "training failed (srun exit $SCTD_RC); see $RUN_DIR"
    exit $((SCTD_RC == 0 ? 1 : SCTD_RC))
}
