#!/usr/bin/env bash
# cluster/deepspeed/start_ray_from_hostfile.sh HOSTFILE [start_ray_cluster.sh options, e.g. --stop]
# For machines listed in a DeepSpeed hostfile and reached over ssh, as `deepspeed --hostfile` would use them:
# starts the Ray cluster recllm trains on (head on the first host, which must be this machine; one worker node on
# each other host) through cluster/start_ray_cluster.sh. Then: RAY_ADDRESS=<head>:6379 recllm pipeline CONFIG.
# --print shows the start_ray_cluster.sh command instead of running it.
set -euo pipefail
HOSTFILE=${1:?usage: start_ray_from_hostfile.sh HOSTFILE [--print] [start_ray_cluster.sh options]}
shift
PRINT=0
if [[ ${1:-} == --print ]]; then PRINT=1; shift; fi

HOSTS=()
while read -r host _; do
  [[ -z $host || $host == \#* ]] || HOSTS+=("$host")
done <"$HOSTFILE"
((${#HOSTS[@]})) || { echo "start_ray_from_hostfile.sh: no hosts in $HOSTFILE" >&2; exit 2; }

HEAD_IP=$(getent hosts "${HOSTS[0]}" | awk '{print $1; exit}' || true)
WORKERS=$(IFS=,; echo "${HOSTS[*]:1}")
CMD=("$(dirname "$0")/../start_ray_cluster.sh" --head-ip "${HEAD_IP:-${HOSTS[0]}}")
[[ -z $WORKERS ]] || CMD+=(--worker-hosts "$WORKERS")
CMD+=("$@")
if ((PRINT)); then printf '%q ' "${CMD[@]}"; echo; else exec "${CMD[@]}"; fi
