#!/usr/bin/env bash
# Pod entrypoint: turn an Indexed Job pod's environment into one `deepspeed --no_ssh` launch.
#
#   launch/k8s-entry.sh [extra flags for launch/train.py or launch/twa.py]
#
# runs, on node R of N (R = JOB_COMPLETION_INDEX, set by Kubernetes for Indexed Jobs):
#
#   deepspeed --hostfile H --no_ssh --node_rank R --master_addr ADDR --master_port P \
#       launch/train.py [--metrics-port M] "$@" --auto-resume|--resume   (TWA_SCALE_ROLE=train; launch/twa.py for twa)
#
# Auto-resume (TWA_SCALE_ROLE=train), so a restarted pod continues where the job stopped: --resume when
# TWA_SCALE_RESTART_ATTEMPT > 0 (JobSet's restart counter: the run exists, checkpointed or not yet), else
# --auto-resume: the job resumes when a checkpoint exists, in --checkpoint-dir or committed at
# --checkpoint-url (the object store: a recreated pod's local disk is empty); an explicit --resume is kept.
# A relaunch of the same job (TWA_SCALE_JOB_ID, the JobSet's uid in the manifests) takes over the
# run's writer lease at once, even the live-looking one a kill -9 left behind.
#
# Exit status (twa_scale/errors.py; the JobSet failure policy in k8s/base/jobset.yaml maps them):
#   0    done
#   2    bad configuration: a variable below is missing or malformed, or the job rejected its flags
#   75   transient (EX_TEMPFAIL): pod 0 did not resolve within TWA_SCALE_RDZV_TIMEOUT_SECONDS (still
#        Pending), the store was unreachable at start, the rendezvous timed out
#   143  SIGTERM (preemption): forwarded to the ranks, which flush pending snapshots first
#   else what the job exited with (a crash)
#
# Environment (required):
#   JOB_COMPLETION_INDEX            this pod's node rank, 0..TWA_SCALE_NNODES-1
#   TWA_SCALE_NNODES                number of nodes (= the Job's completions and parallelism)
#   TWA_SCALE_GPUS_PER_NODE         processes per node (GPUs; on CPU the number of gloo ranks)
#   TWA_SCALE_SERVICE_NAME          headless Service that gives each pod the DNS name <job>-<index>.<service>
#   TWA_SCALE_MASTER_PORT           rendezvous port on node 0
#   TWA_SCALE_ROLE                  train | twa
# Environment (optional):
#   TWA_SCALE_JOB_NAME              the Job's name; default: this pod's hostname without its "-<index>" suffix
#   TWA_SCALE_MASTER_ADDR           rendezvous host; default <job>-0.<service> (tests point it at 127.0.0.1)
#   TWA_SCALE_METRICS_PORT          passed as --metrics-port (one exporter per pod); unset = the script's default
#   TWA_SCALE_HOSTFILE              where to write the DeepSpeed hostfile; default a file in ${TMPDIR:-/tmp}
#   TWA_SCALE_RDZV_TIMEOUT_SECONDS  how long node R>0 waits for node 0's DNS name (default 600)
#   TWA_SCALE_RESTART_ATTEMPT       > 0 on a restarted pod: resume (the JobSet pods get it from their restart-attempt label)
#   TWA_SCALE_JOB_ID                this job's identity, read by the training job (the JobSet pods: the JobSet's uid)
set -euo pipefail

EXIT_CONFIG=2 EXIT_TEMPFAIL=75 EXIT_PREEMPTED=143
die() { echo "k8s-entry: $*" >&2; exit $EXIT_CONFIG; }               # permanent: fix the manifest
tempfail() { echo "k8s-entry: $* (transient, exit $EXIT_TEMPFAIL)" >&2; exit $EXIT_TEMPFAIL; }

# SIGTERM before the launch (e.g. while waiting for pod 0): nothing to flush.
trap 'echo "k8s-entry: SIGTERM before launch" >&2; exit $EXIT_PREEMPTED' TERM INT

need() {  # need VAR "what it is": fail naming the variable when it is unset or empty
    [[ -n "${!1:-}" ]] || die "environment variable $1 is not set ($2)"
}

need_int() {  # need_int VAR MIN
    [[ "${!1}" =~ ^[0-9]+$ ]] && (( ${!1} >= $2 )) || die "environment variable $1=${!1} must be an integer >= $2"
}

need JOB_COMPLETION_INDEX "node rank; Kubernetes sets it for Jobs with completionMode: Indexed"
need TWA_SCALE_NNODES "number of nodes, equal to the Job's completions"
need TWA_SCALE_GPUS_PER_NODE "processes per node"
need TWA_SCALE_SERVICE_NAME "name of the headless Service of the Job"
need TWA_SCALE_MASTER_PORT "rendezvous port on node 0"
need TWA_SCALE_ROLE "train or twa"
need_int TWA_SCALE_NNODES 1
need_int TWA_SCALE_GPUS_PER_NODE 1
need_int JOB_COMPLETION_INDEX 0
need_int TWA_SCALE_MASTER_PORT 1
(( JOB_COMPLETION_INDEX < TWA_SCALE_NNODES )) \
    || die "JOB_COMPLETION_INDEX=$JOB_COMPLETION_INDEX is not below TWA_SCALE_NNODES=$TWA_SCALE_NNODES"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$TWA_SCALE_ROLE" in
    train) script="$here/train.py" ;;
    twa) script="$here/twa.py" ;;
    *) die "environment variable TWA_SCALE_ROLE=$TWA_SCALE_ROLE must be 'train' or 'twa'" ;;
esac
[[ -f "$script" ]] || die "launch script $script not found (TWA_SCALE_ROLE=$TWA_SCALE_ROLE)"
command -v deepspeed >/dev/null || die "the 'deepspeed' launcher is not on PATH"

# Indexed Job pods are named <job>-<index> (their hostname), so the Job name needs no wiring.
host="${HOSTNAME:-$(hostname)}"
job="${TWA_SCALE_JOB_NAME:-${host%-*}}"
master="${TWA_SCALE_MASTER_ADDR:-$job-0.$TWA_SCALE_SERVICE_NAME}"

# With --no_ssh the hostfile only fixes the world layout (names are not dialled): N nodes x G slots.
hostfile="${TWA_SCALE_HOSTFILE:-${TMPDIR:-/tmp}/twa-hostfile-$TWA_SCALE_ROLE-$JOB_COMPLETION_INDEX}"
: > "$hostfile"
for ((i = 0; i < TWA_SCALE_NNODES; i++)); do
    echo "$job-$i.$TWA_SCALE_SERVICE_NAME slots=$TWA_SCALE_GPUS_PER_NODE" >> "$hostfile"
done

# Pod 0's DNS record appears only once it is scheduled; wait for it instead of failing the rendezvous.
# A pod 0 still Pending after the timeout (no capacity yet) is transient: exit 75, the JobSet restarts.
if (( JOB_COMPLETION_INDEX > 0 )); then
    timeout="${TWA_SCALE_RDZV_TIMEOUT_SECONDS:-600}"
    deadline=$(( SECONDS + timeout ))
    until getent hosts "$master" >/dev/null; do
        (( SECONDS < deadline )) || tempfail "rendezvous host $master (TWA_SCALE_MASTER_ADDR) did not resolve within ${timeout}s: pod 0 is not running"
        sleep 2
    done
fi

metrics=()
[[ -n "${TWA_SCALE_METRICS_PORT:-}" ]] && metrics=(--metrics-port "$TWA_SCALE_METRICS_PORT")

# Auto-resume: a restarted training pod continues from the newest checkpoint (local or on the store).
resume=()
if [[ "$TWA_SCALE_ROLE" == train && " $* " != *" --resume "* ]]; then
    if [[ "${TWA_SCALE_RESTART_ATTEMPT:-0}" =~ ^[1-9][0-9]*$ ]]; then
        resume=(--resume)
        echo "k8s-entry: auto-resume (restart attempt $TWA_SCALE_RESTART_ATTEMPT)" >&2
    else
        resume=(--auto-resume)   # the job looks for a checkpoint itself: it knows the resolved URLs
    fi
fi

# --log_level warning: the launcher's own INFO lines (its command line, world info) stay out of the pod log
cmd=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$JOB_COMPLETION_INDEX"
     --master_addr "$master" --master_port "$TWA_SCALE_MASTER_PORT" --log_level warning "$script" "${metrics[@]}" "$@" "${resume[@]}")
echo "k8s-entry: node $JOB_COMPLETION_INDEX/$TWA_SCALE_NNODES x $TWA_SCALE_GPUS_PER_NODE, rendezvous $master:$TWA_SCALE_MASTER_PORT" >&2
echo "k8s-entry: ${cmd[*]}" >&2

# Not exec: this shell is the container's PID 1 and must turn the pod's SIGTERM into one SIGTERM per
# rank. The deepspeed runner ignores it under --no_ssh (it would die and orphan the ranks), so the
# signal goes to its child, deepspeed.launcher.launch, which terminates every rank once (they flush
# their snapshots and exit 143) and kills what is left after 30 s.
"${cmd[@]}" &
child=$!
terminated=0
forward() {
    terminated=1
    local kids
    kids="$(cat "/proc/$child/task/$child/children" 2>/dev/null || true)"
    echo "k8s-entry: SIGTERM: stopping the ranks (launcher ${kids:-$child})" >&2
    # shellcheck disable=SC2086
    kill -TERM ${kids:-$child} 2>/dev/null || true
}
trap forward TERM INT
status=0
while true; do
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break     # a trap interrupted wait: keep waiting
done
if (( terminated )); then
    echo "k8s-entry: stopped by SIGTERM (launcher exited $status); exit $EXIT_PREEMPTED" >&2
    exit $EXIT_PREEMPTED
fi
exit "$status"
