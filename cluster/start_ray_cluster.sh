#!/usr/bin/env bash
# Start a Ray cluster by hand, for bare machines and for cluster/slurm/recllm.sbatch: a head node plus N worker
# nodes on this machine, worker nodes on other machines over ssh, or one worker node that joins a head (one call
# per machine, e.g. from srun). Every node is a `ray start --block` process in its own process group, recorded in
# the state dir; --stop stops exactly those processes (never `ray stop`, which would kill every Ray on the host).
# Token auth is always on: the head makes a token when none exists, ssh workers get it on stdin, clients need it.
#
#   cluster/start_ray_cluster.sh --head-ip 10.0.0.1                              # head here; workers join later
#   cluster/start_ray_cluster.sh --head-ip 10.0.0.1 --worker-hosts gpu1,gpu2     # + one worker node per host (ssh)
#   cluster/start_ray_cluster.sh --worker --head-ip 10.0.0.1 --block             # this machine joins (srun)
#   cluster/start_ray_cluster.sh --head-ip 127.0.0.1 --num-workers 1 --head-cpus 1 --worker-cpus 1   # 2 nodes, 1 host
#   cluster/start_ray_cluster.sh --wait 3 --head-ip 10.0.0.1                     # wait until 3 nodes are alive
#   cluster/start_ray_cluster.sh --stop                                          # stop what this state dir started
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; cat <<'EOF'
options:
  --head-ip IP            address of the head node (required to start or wait)
  --num-workers N         worker node processes to start on this machine next to the head (default 0)
  --worker-hosts H1,H2    start one worker node on each host over ssh (same repo path there)
  --worker                start one worker node on this machine that joins --head-ip
  --port P                GCS port of the head (default 6379)
  --dashboard-port P      dashboard / Ray Jobs API port (default 8265)
  --dashboard-host H      address the dashboard / Jobs API binds (default 127.0.0.1; reach it through ssh -L)
  --port-base P           ports of the k-th node started here: P+1000k .. P+1000k+999 (default 20000)
  --head-cpus N | --worker-cpus N | --gpus N    resources a node advertises (default: what Ray detects)
  --temp-dir DIR          Ray's temp dir (sessions, logs, sockets; keep it short, default /tmp/ray)
  --state-dir DIR         pid files and logs of this script (default /tmp/recllm-ray-$USER-<host>-<port>)
  --block                 stay in the foreground until a signal, then stop the nodes (srun)
  --timeout S             seconds to wait for nodes to come up (default 180)
  --stop                  stop the nodes recorded in the state dir (and on --worker-hosts)
  --token-stdin           (--worker) read the cluster token from stdin instead of RAY_AUTH_TOKEN or the token file
token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token); the head creates the file (0600)
when neither exists. Clients (`recllm submit`, `ray job`) need the same token: copy the file or set RAY_AUTH_TOKEN.
EOF
}

HEAD_IP="" NUM_WORKERS=0 WORKER_HOSTS="" ROLE=head PORT=6379 DASHBOARD_PORT=8265 DASHBOARD_HOST=127.0.0.1
PORT_BASE=20000 HEAD_CPUS="" WORKER_CPUS="" GPUS="" TEMP_DIR="" STATE_DIR="" BLOCK=0 TIMEOUT=180 WAIT_NODES="" TOKEN_STDIN=0
while (($#)); do
  case "$1" in
    --head-ip) HEAD_IP=$2; shift ;;
    --num-workers) NUM_WORKERS=$2; shift ;;
    --worker-hosts) WORKER_HOSTS=$2; shift ;;
    --worker) ROLE=worker ;;
    --stop) ROLE=stop ;;
    --wait) ROLE=wait; WAIT_NODES=$2; shift ;;
    --port) PORT=$2; shift ;;
    --dashboard-port) DASHBOARD_PORT=$2; shift ;;
    --dashboard-host) DASHBOARD_HOST=$2; shift ;;
    --port-base) PORT_BASE=$2; shift ;;
    --head-cpus) HEAD_CPUS=$2; shift ;;
    --worker-cpus) WORKER_CPUS=$2; shift ;;
    --gpus) GPUS=$2; shift ;;
    --temp-dir) TEMP_DIR=$2; shift ;;
    --state-dir) STATE_DIR=$2; shift ;;
    --block) BLOCK=1 ;;
    --timeout) TIMEOUT=$2; shift ;;
    --token-stdin) TOKEN_STDIN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start_ray_cluster.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/.." && pwd)
STATE_DIR=${STATE_DIR:-${TMPDIR:-/tmp}/recllm-ray-${USER:-$(id -un)}-$(hostname -s)-$PORT}
RAY=${RAY:-ray}
PYTHON=${PYTHON:-$(dirname "$(command -v "$RAY")")/python}
[[ -x $PYTHON ]] || PYTHON=python3
log() { echo "[start_ray_cluster] $*" >&2; }

# Token auth always: without it anyone who reaches the GCS or the Jobs API runs code on every node.
[[ ${RAY_AUTH_MODE:-token} == token ]] || log "ignoring RAY_AUTH_MODE=$RAY_AUTH_MODE: this script always uses token"
export RAY_AUTH_MODE=token
TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}

make_token() {  # the head: use RAY_AUTH_TOKEN or the token file; create the file (owner-only) when neither exists
  [[ -n ${RAY_AUTH_TOKEN:-} ]] && return 0
  if [[ ! -s $TOKEN_FILE ]]; then
    (umask 077 && mkdir -p "$(dirname "$TOKEN_FILE")" &&
      od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE.$$" && mv "$TOKEN_FILE.$$" "$TOKEN_FILE")
    log "new cluster token in $TOKEN_FILE; clients need it too (README: Token auth)"
  fi
  export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
}

find_token() {  # a worker or a waiting client: the head's token, from stdin, the env or the (shared) token file
  if ((TOKEN_STDIN)); then IFS= read -r RAY_AUTH_TOKEN || true; export RAY_AUTH_TOKEN; fi
  [[ -n ${RAY_AUTH_TOKEN:-} ]] && return 0
  local deadline=$((SECONDS + TIMEOUT))
  until [[ -s $TOKEN_FILE ]]; do  # the head writes it before it starts; a shared filesystem may show it late
    if ((SECONDS > deadline)); then
      log "no cluster token: set RAY_AUTH_TOKEN, pass --token-stdin, or copy the head's token file to $TOKEN_FILE"
      return 1
    fi
    sleep 1
  done
  export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
}

token_value() { if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then printf '%s\n' "$RAY_AUTH_TOKEN"; else cat "$TOKEN_FILE"; echo; fi; }

node_ports() {  # node_ports K: the fixed ports of the k-th node started from here, so nodes on one host never clash
  local b=$((PORT_BASE + 1000 * $1))
  echo "--node-manager-port=$b --object-manager-port=$((b + 1)) --dashboard-agent-listen-port=$((b + 2))" \
       "--dashboard-agent-grpc-port=$((b + 3)) --runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5))" \
       "--min-worker-port=$((b + 100)) --max-worker-port=$((b + 999))"
}

start_node() {  # start_node NAME TEMP_DIR ARGS...: `ray start --block` in its own session; its pid names its group
  local name=$1 temp_dir=$2; shift 2
  mkdir -p "$STATE_DIR"
  if [[ -f $STATE_DIR/$name.pid ]] && kill -0 "$(cat "$STATE_DIR/$name.pid")" 2>/dev/null; then
    log "$name already running (pid $(cat "$STATE_DIR/$name.pid")); --stop first"; exit 1
  fi
  setsid "$RAY" start --block --disable-usage-stats --log-style=record ${temp_dir:+--temp-dir="$temp_dir"} "$@" \
    >"$STATE_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/$name.pid"
  log "$name: pid $!, log $STATE_DIR/$name.log"
}

wait_started() {  # wait_started NAME: until its log says the node runs, or fail if it died or timed out
  local name=$1 pid deadline=$((SECONDS + TIMEOUT))
  pid=$(cat "$STATE_DIR/$name.pid")
  until grep -q "Ray runtime started" "$STATE_DIR/$name.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited; its log:"; tail -n 30 "$STATE_DIR/$name.log" >&2; return 1
    fi
    if ((SECONDS > deadline)); then log "$name not up after ${TIMEOUT}s"; return 1; fi
    sleep 1
  done
}

wait_for_port() {  # wait_for_port HOST PORT: the head's GCS accepts connections
  local deadline=$((SECONDS + TIMEOUT))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    if ((SECONDS > deadline)); then log "nothing listens on $1:$2 after ${TIMEOUT}s"; return 1; fi
    sleep 1
  done
}

wait_for_nodes() {  # wait_for_nodes N: until N nodes are alive in the cluster
  "$PYTHON" - "$HEAD_IP:$PORT" "$1" "$TIMEOUT" <<'PY'
import sys, time
import ray
address, expected, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + timeout
while (alive := sum(n["Alive"] for n in ray.nodes())) < expected:
    if time.monotonic() > deadline:
        sys.exit(f"[start_ray_cluster] only {alive} of {expected} nodes alive after {timeout:.0f}s")
    time.sleep(1)
print(f"[start_ray_cluster] {alive} nodes alive at {address}", file=sys.stderr)
PY
}

stop_nodes() {  # SIGTERM each recorded `ray start --block` (it stops its node), then SIGKILL what is left of its group
  local file pid deadline=$((SECONDS + 15))
  for file in "$STATE_DIR"/*.pid; do  # only a live `ray start` (a stale pid file may name someone else's process)
    [[ -e $file ]] && [[ $(ps -o args= -p "$(cat "$file")" 2>/dev/null) == *"ray start"* ]] &&
      kill -TERM "$(cat "$file")" 2>/dev/null || true
  done
  for file in "$STATE_DIR"/*.pid; do
    [[ -e $file ]] || continue
    pid=$(cat "$file")
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$file"
    log "stopped $(basename "$file" .pid) (process group $pid)"
  done
}

remote() {  # remote HOST ARGS...: run this script on HOST with the shared options (stdin goes to it)
  ssh -o BatchMode=yes "$1" "cd $(printf %q "$REPO") && $(printf %q "$SCRIPT") --head-ip $(printf %q "$HEAD_IP")" \
    "--port $PORT --port-base $PORT_BASE --timeout $TIMEOUT" \
    "${TEMP_DIR:+--temp-dir $(printf %q "$TEMP_DIR")} ${WORKER_CPUS:+--worker-cpus $WORKER_CPUS}" \
    "${GPUS:+--gpus $GPUS} ${*:2}"
}

IFS=, read -r -a HOSTS <<<"$WORKER_HOSTS"
case "$ROLE" in
  stop)
    for host in "${HOSTS[@]}"; do remote "$host" --stop </dev/null || log "stop on $host failed"; done
    stop_nodes
    exit 0 ;;
  wait)
    [[ -n $HEAD_IP ]] || { log "--head-ip is required"; exit 2; }
    wait_for_port "$HEAD_IP" "$PORT"
    find_token
    wait_for_nodes "$WAIT_NODES"
    exit 0 ;;
esac

[[ -n $HEAD_IP ]] || { log "--head-ip is required (see --help)"; exit 2; }
on_signal() { stop_nodes; exit 0; }
trap on_signal TERM INT  # while starting, and for good with --block

if [[ $ROLE == worker ]]; then
  wait_for_port "$HEAD_IP" "$PORT"
  find_token
  # shellcheck disable=SC2046
  start_node worker-0 "$TEMP_DIR" --address="$HEAD_IP:$PORT" \
    ${WORKER_CPUS:+--num-cpus="$WORKER_CPUS"} ${GPUS:+--num-gpus="$GPUS"} \
    $(node_ports 0)
  wait_started worker-0 || { stop_nodes; exit 1; }
else
  make_token
  # shellcheck disable=SC2046
  start_node head "$TEMP_DIR" --head --node-ip-address="$HEAD_IP" --port="$PORT" --dashboard-host="$DASHBOARD_HOST" \
    --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port=$((PORT_BASE + 10)) \
    ${HEAD_CPUS:+--num-cpus="$HEAD_CPUS"} ${GPUS:+--num-gpus="$GPUS"} $(node_ports 0)
  wait_started head || { stop_nodes; exit 1; }
  for ((k = 1; k <= NUM_WORKERS; k++)); do
    # Its own temp dir: nodes sharing one would unpack each job's working_dir over one another's.
    # shellcheck disable=SC2046
    start_node "worker-$k" "${TEMP_DIR:-/tmp/ray}/node-$k" --address="$HEAD_IP:$PORT" \
      ${WORKER_CPUS:+--num-cpus="$WORKER_CPUS"} ${GPUS:+--num-gpus="$GPUS"} $(node_ports "$k")
  done
  for ((k = 1; k <= NUM_WORKERS; k++)); do wait_started "worker-$k" || { stop_nodes; exit 1; }; done
  for host in "${HOSTS[@]}"; do  # the token travels on ssh's stdin, never on a command line
    token_value | remote "$host" --worker --token-stdin || { log "worker on $host failed"; stop_nodes; exit 1; }
  done
  wait_for_nodes $((1 + NUM_WORKERS + ${#HOSTS[@]})) || { stop_nodes; exit 1; }
  log "dashboard / Ray Jobs API: http://${DASHBOARD_HOST/0.0.0.0/$HEAD_IP}:$DASHBOARD_PORT   GCS: $HEAD_IP:$PORT   token auth:" \
      "${RAY_AUTH_TOKEN_PATH:-RAY_AUTH_TOKEN}"
fi

if ((BLOCK)); then
  # Stay up while every node runs; a node that dies takes the rest down so srun sees the failure.
  all_alive() { for f in "$STATE_DIR"/*.pid; do kill -0 "$(cat "$f")" 2>/dev/null || return 1; done; }
  while all_alive; do sleep 5 & wait $!; done
  log "a node exited; stopping the others"; stop_nodes; exit 1
fi
trap - TERM INT
