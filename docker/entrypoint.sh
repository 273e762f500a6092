#!/usr/bin/env bash
# One entrypoint for every rbm-study container (and for the cluster tests, which run this very
# script on loopback):
#
#   entrypoint.sh head   [extra `ray start` args]   a Ray head node, in the foreground
#   entrypoint.sh worker [extra `ray start` args]   a Ray worker node joining $RAY_HEAD
#   entrypoint.sh driver launch|resume|status ...    rbm-study against the cluster at $RAY_HEAD
#   entrypoint.sh <anything else>                    run it (e.g. bash)
#
# Environment:
#   RAY_HEAD       host:port of the head (worker, driver)          e.g. head:6379
#   RAY_PORT       the head's GCS port (head; default 6379)
#   RAY_NODE_IP    this node's IP (default: `hostname -i`); 127.0.0.1 keeps Ray on loopback
#   RAY_NUM_CPUS   CPUs this node offers (default: all); RAY_NUM_GPUS likewise (default: detected)
#   RBM_STUDY_NODE a readable node name recorded with every trial (default: role-hostname)
#   RBM_STUDY_DRIVER_NODE=0  the driver joins without a Ray node of its own (it then needs a Ray
#                  node with the same IP, e.g. when it runs beside the head)
#   MNIST_ROOT     where each node finds MNIST (every node that runs trials needs it)
#   PYTHON         the interpreter (default: python)
set -euo pipefail

role="${1:-}"
[ $# -gt 0 ] && shift
PYTHON="${PYTHON:-python}"
NODE_IP="${RAY_NODE_IP:-$(hostname -i 2>/dev/null | awk '{print $1}')}"
NODE_IP="${NODE_IP:-127.0.0.1}"
export RAY_USAGE_STATS_ENABLED=0

node_args=(--node-ip-address "$NODE_IP" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && node_args+=(--num-cpus "$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && node_args+=(--num-gpus "$RAY_NUM_GPUS")

need_head() {
  if [ -z "${RAY_HEAD:-}" ]; then
    echo "entrypoint.sh $role: set RAY_HEAD=host:port of the Ray head (e.g. head:6379)" >&2
    exit 2
  fi
}

case "$role" in
  head)
    export RBM_STUDY_NODE="${RBM_STUDY_NODE:-head-$(hostname)}"
    exec "$PYTHON" -m rbm_study.study.raynode start --head --block --port "${RAY_PORT:-6379}" \
      --include-dashboard "${RAY_DASHBOARD:-false}" "${node_args[@]}" "$@"
    ;;
  worker)
    need_head
    export RBM_STUDY_NODE="${RBM_STUDY_NODE:-worker-$(hostname)}"
    exec "$PYTHON" -m rbm_study.study.raynode start --block --address "$RAY_HEAD" "${node_args[@]}" "$@"
    ;;
  driver)
    need_head
    if [ "${RBM_STUDY_DRIVER_NODE:-1}" = "1" ]; then
      # A driver needs a Ray node on its own IP; a 0-CPU one runs no trials.
      "$PYTHON" -m rbm_study.study.raynode start --address "$RAY_HEAD" --node-ip-address "$NODE_IP" \
        --num-cpus 0 --num-gpus 0 --disable-usage-stats
    fi
    case "${1:-}" in
      launch|resume) set -- "$@" --address "$RAY_HEAD" ;;
    esac
    exec "$PYTHON" -m rbm_study "$@"
    ;;
  ""|-h|--help)
    sed -n '2,22p' "$0"
    exit 2
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
