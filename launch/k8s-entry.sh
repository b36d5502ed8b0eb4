#!/usr/bin/env bash
# Pod entrypoint: turn an Indexed Job pod's environment into one `deepspeed --no_ssh` launch.
#
#   launch/k8s-entry.sh [extra flags for launch/train.py or launch/twa.py]
#
# runs, on node R of N (R = JOB_COMPLETION_INDEX, set by Kubernetes for Indexed Jobs):
#
#   deepspeed --hostfile H --no_ssh --node_rank R --master_addr ADDR --master_port P \
#       launch/train.py [--metrics-port M] "$@"          (TWA_ROLE=train; launch/twa.py for TWA_ROLE=twa)
#
# Environment (required):
#   JOB_COMPLETION_INDEX  this pod's node rank, 0..TWA_NNODES-1
#   TWA_NNODES            number of nodes (= the Job's completions and parallelism)
#   TWA_GPUS_PER_NODE     processes per node (GPUs; on CPU the number of gloo ranks)
#   TWA_SERVICE_NAME      headless Service that gives each pod the DNS name <job>-<index>.<service>
#   TWA_MASTER_PORT       rendezvous port on node 0
#   TWA_ROLE              train | twa
# Environment (optional):
#   TWA_JOB_NAME          the Job's name; default: this pod's hostname without its "-<index>" suffix
#   TWA_MASTER_ADDR       rendezvous host; default <job>-0.<service> (tests point it at 127.0.0.1)
#   TWA_METRICS_PORT      passed as --metrics-port (one exporter per pod); unset = the script's default
#   TWA_HOSTFILE          where to write the DeepSpeed hostfile; default a file in ${TMPDIR:-/tmp}
#   TWA_RDZV_TIMEOUT_SECONDS  how long node R>0 waits for node 0's DNS name (default 600)
set -euo pipefail

die() { echo "k8s-entry: $*" >&2; exit 2; }

need() {  # need VAR "what it is": fail naming the variable when it is unset or empty
    [[ -n "${!1:-}" ]] || die "environment variable $1 is not set ($2)"
}

need_int() {  # need_int VAR MIN
    [[ "${!1}" =~ ^[0-9]+$ ]] && (( ${!1} >= $2 )) || die "environment variable $1=${!1} must be an integer >= $2"
}

need JOB_COMPLETION_INDEX "node rank; Kubernetes sets it for Jobs with completionMode: Indexed"
need TWA_NNODES "number of nodes, equal to the Job's completions"
need TWA_GPUS_PER_NODE "processes per node"
need TWA_SERVICE_NAME "name of the headless Service of the Job"
need TWA_MASTER_PORT "rendezvous port on node 0"
need TWA_ROLE "train or twa"
need_int TWA_NNODES 1
need_int TWA_GPUS_PER_NODE 1
need_int JOB_COMPLETION_INDEX 0
need_int TWA_MASTER_PORT 1
(( JOB_COMPLETION_INDEX < TWA_NNODES )) \
    || die "JOB_COMPLETION_INDEX=$JOB_COMPLETION_INDEX is not below TWA_NNODES=$TWA_NNODES"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$TWA_ROLE" in
    train) script="$here/train.py" ;;
    twa) script="$here/twa.py" ;;
    *) die "environment variable TWA_ROLE=$TWA_ROLE must be 'train' or 'twa'" ;;
esac
[[ -f "$script" ]] || die "launch script $script not found (TWA_ROLE=$TWA_ROLE)"
command -v deepspeed >/dev/null || die "the 'deepspeed' launcher is not on PATH"

# Indexed Job pods are named <job>-<index> (their hostname), so the Job name needs no wiring.
host="${HOSTNAME:-$(hostname)}"
job="${TWA_JOB_NAME:-${host%-*}}"
master="${TWA_MASTER_ADDR:-$job-0.$TWA_SERVICE_NAME}"

# With --no_ssh the hostfile only fixes the world layout (names are not dialled): N nodes x G slots.
hostfile="${TWA_HOSTFILE:-${TMPDIR:-/tmp}/twa-hostfile-$TWA_ROLE-$JOB_COMPLETION_INDEX}"
: > "$hostfile"
for ((i = 0; i < TWA_NNODES; i++)); do
    echo "$job-$i.$TWA_SERVICE_NAME slots=$TWA_GPUS_PER_NODE" >> "$hostfile"
done

# Pod 0's DNS record appears only once it is scheduled; wait for it instead of failing the rendezvous.
if (( JOB_COMPLETION_INDEX > 0 )); then
    deadline=$(( SECONDS + ${TWA_RDZV_TIMEOUT_SECONDS:-600} ))
    until getent hosts "$master" >/dev/null; do
        (( SECONDS < deadline )) || die "rendezvous host $master (TWA_MASTER_ADDR) did not resolve within ${TWA_RDZV_TIMEOUT_SECONDS:-600}s"
        sleep 2
    done
fi

metrics=()
[[ -n "${TWA_METRICS_PORT:-}" ]] && metrics=(--metrics-port "$TWA_METRICS_PORT")

cmd=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$JOB_COMPLETION_INDEX"
     --master_addr "$master" --master_port "$TWA_MASTER_PORT" "$script" "${metrics[@]}" "$@")
echo "k8s-entry: node $JOB_COMPLETION_INDEX/$TWA_NNODES x $TWA_GPUS_PER_NODE, rendezvous $master:$TWA_MASTER_PORT" >&2
echo "k8s-entry: ${cmd[*]}" >&2
# exec: the pod's SIGTERM reaches the launcher, which forwards it to every rank.
exec "${cmd[@]}"
