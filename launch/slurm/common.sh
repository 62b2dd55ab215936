# shellcheck shell=bash
# Shared body of the SLURM batch templates (elfish.sbatch, sweep.sbatch); sourced, not run.
#
# elfish_train OUT [ARG...] runs `srun --mpi=$ELFISH_SRUN_MPI --kill-on-bad-exit=1
# [--cpus-per-task=$SLURM_CPUS_PER_TASK] $ELFISH_SRUN_ARGS python -m elfish_mpi train --out OUT
# [--resume OUT] ARG... $ELFISH_ARGS` and handles preemption:
#
#   * the MPI plugin: ELFISH_SRUN_MPI unset means pmi2 (what the MPICH wheel needs); set it
#     to another plugin (`srun --mpi=list`: pmix, pmix_v4, ... for a site MPI built with
#     PMIx) or to the empty string to leave --mpi out and use the site's MpiDefault;
#   * a job submitted with --cpus-per-task=N gives each task N CPUs: srun (which since SLURM
#     22.05 no longer inherits --cpus-per-task from sbatch) is passed it again, and the
#     program runs N torch threads per rank when run.threads is not set (elfish_mpi/config.py);
#   * auto-resume: --resume OUT is added when OUT/checkpoint.h5 or OUT/checkpoints/round-*.h5
#     exists (a requeued job continues where it stopped);
#   * SIGUSR1 / SIGTERM sent to the batch shell are forwarded to srun as SIGUSR1 (srun turns a
#     SIGTERM of its own into SIGKILL for the tasks, but passes SIGUSR1 on), and srun forwards
#     it to every task; the program then finishes the current round, writes a checkpoint and
#     every rank exits with 75 (elfish_mpi.signals.EXIT_PREEMPTED);
#   * exit 75 after SIGUSR1 (the time-limit warning of `#SBATCH --signal=B:USR1@120`, or
#     `scancel --batch --signal=USR1 JOBID`): the script requeues its own job
#     (`scontrol requeue $SLURM_JOB_ID`) and exits 0, so the job is neither marked failed nor
#     lost; it starts again later and resumes;
#   * exit 75 otherwise (SLURM preempted or requeued the job: it sent SIGTERM to the tasks
#     and requeues the job by itself; or scancel): the script exits 75 and does nothing else;
#   * any other exit code is passed through (0: the run is complete).

ELFISH_EXIT_PREEMPTED=75

elfish_log() { echo "elfish-slurm: $(date '+%F %T') $*"; }
elfish_die() { echo "elfish-slurm: error: $*" >&2; exit 2; }

# elfish_require_env VAR...: every VAR must be set and non-empty.
elfish_require_env() {
    local v
    for v in "$@"; do
        [ -n "${!v:-}" ] || elfish_die "$v is not set; submit with sbatch --export=ALL,$v=...  (see the header of the batch script)"
    done
}

# Activate ELFISH_PYTHON_ENV (a virtual environment) when given.
elfish_activate() {
    [ -n "${ELFISH_PYTHON_ENV:-}" ] || return 0
    [ -f "$ELFISH_PYTHON_ENV/bin/activate" ] || elfish_die "ELFISH_PYTHON_ENV=$ELFISH_PYTHON_ENV is not a virtual environment (no bin/activate)"
    # shellcheck disable=SC1091
    source "$ELFISH_PYTHON_ENV/bin/activate"
}

# elfish_has_checkpoint DIR: does DIR hold a checkpoint to resume from?
elfish_has_checkpoint() {
    [ -f "$1/checkpoint.h5" ] && return 0
    compgen -G "$1/checkpoints/round-*.h5" >/dev/null
}

# ELFISH_ARGS split like a shell command line (quotes are honoured, nothing is expanded),
# into the array ELFISH_EXTRA.
elfish_split_args() {
    ELFISH_EXTRA=()
    [ -n "${ELFISH_ARGS:-}" ] || return 0
    local quoted
    quoted=$(python -c 'import shlex, sys; print(" ".join(shlex.quote(a) for a in shlex.split(sys.argv[1])))' "$ELFISH_ARGS") \
        || elfish_die "ELFISH_ARGS cannot be parsed as a command line: $ELFISH_ARGS"
    eval "ELFISH_EXTRA=($quoted)"  # safe: every word is shlex.quote'd
}

# srun's options, into the array ELFISH_SRUN: --mpi=$ELFISH_SRUN_MPI (default pmi2; left out
# when ELFISH_SRUN_MPI is set to ""), --kill-on-bad-exit=1, --cpus-per-task=$SLURM_CPUS_PER_TASK
# when the job has it, then ELFISH_SRUN_ARGS split on whitespace (srun takes the last of a
# repeated option, so these can override the ones before).
elfish_srun_options() {
    local mpi=${ELFISH_SRUN_MPI-pmi2}
    [[ "$mpi" =~ ^[A-Za-z0-9_.-]*$ ]] || elfish_die "ELFISH_SRUN_MPI=$mpi is not an MPI plugin name (srun --mpi=list shows them)"
    ELFISH_SRUN=()
    [ -n "$mpi" ] && ELFISH_SRUN+=("--mpi=$mpi")
    ELFISH_SRUN+=(--kill-on-bad-exit=1)
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
        [[ "$SLURM_CPUS_PER_TASK" =~ ^[1-9][0-9]*$ ]] || elfish_die "SLURM_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK is not a number of CPUs"
        ELFISH_SRUN+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    fi
    local extra=()
    read -r -a extra <<<"${ELFISH_SRUN_ARGS:-}"  # (no glob expansion, unlike an unquoted word list)
    ELFISH_SRUN+=(${extra[@]+"${extra[@]}"})
}

_elfish_signal=""   # the first stop signal the batch shell received (USR1 or TERM)
_elfish_trapped=0
_elfish_pid=""

_elfish_forward() {
    _elfish_trapped=1
    [ -n "$_elfish_signal" ] || _elfish_signal=$1
    if [ -n "$_elfish_pid" ] && kill -0 "$_elfish_pid" 2>/dev/null; then
        # Always forward SIGUSR1: srun passes it on to every task unchanged, while a SIGTERM
        # sent to srun makes it SIGKILL the tasks ("forcing job termination"). The program
        # treats SIGUSR1 and SIGTERM alike.
        elfish_log "batch script received SIG$1; sending SIGUSR1 to srun (pid $_elfish_pid): the run stops after this round with a checkpoint"
        kill -s USR1 "$_elfish_pid" 2>/dev/null || true
    fi
}

# elfish_train OUT [ARG...]: see the top of this file. Returns the exit code for the job.
elfish_train() {
    local out=$1
    shift
    elfish_split_args
    local args=(train --out "$out")
    if elfish_has_checkpoint "$out"; then
        args+=(--resume "$out")
        elfish_log "found a checkpoint in $out: resuming (restart ${SLURM_RESTART_COUNT:-0} of job ${SLURM_JOB_ID:-?})"
    fi
    args+=("$@" ${ELFISH_EXTRA[@]+"${ELFISH_EXTRA[@]}"})  # (empty-array safe for bash < 4.4)
    elfish_srun_options
    elfish_log "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-?} tasks: srun ${ELFISH_SRUN[*]} python -m elfish_mpi ${args[*]}"

    trap '_elfish_forward USR1' USR1
    trap '_elfish_forward TERM' TERM
    # srun takes the number of tasks from the allocation ($SLURM_NTASKS).
    srun "${ELFISH_SRUN[@]}" python -m elfish_mpi "${args[@]}" &
    _elfish_pid=$!
    local rc
    while :; do
        _elfish_trapped=0
        wait "$_elfish_pid"
        rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; wait again.
        [ "$_elfish_trapped" = 1 ] || break
    done
    _elfish_pid=""

    if [ "$rc" = "$ELFISH_EXIT_PREEMPTED" ]; then
        if [ "$_elfish_signal" = USR1 ]; then
            trap '' USR1 TERM  # requeueing our own job sends SIGTERM to this shell
            if [ -z "${SLURM_JOB_ID:-}" ]; then
                elfish_log "stopped with a checkpoint after SIGUSR1, but not in a SLURM job: not requeued"
                return "$rc"
            fi
            elfish_log "stopped with a checkpoint after SIGUSR1: requeueing job $SLURM_JOB_ID"
            if ! scontrol requeue "$SLURM_JOB_ID"; then
                elfish_log "scontrol requeue $SLURM_JOB_ID failed; resubmit the job to continue (it resumes from $out)"
                return "$rc"
            fi
            return 0
        fi
        elfish_log "stopped with a checkpoint (${_elfish_signal:+SIG$_elfish_signal, }preempted or requeued by SLURM); exit $rc, the next start resumes from $out"
        return "$rc"
    fi
    elfish_log "srun exited with $rc"
    return "$rc"
}
