#!/usr/bin/env bash
# A throwaway Redis Cluster of 3 masters on free loopback ports, for the tests (.ci/run starts it
# and exports its seeds as TIERGATE_TEST_REDIS_CLUSTER).
#
#   .ci/redis-cluster.sh start DIR [OWNER_PID]
#       Starts the nodes in DIR (created; must be empty), creates the cluster with
#       `redis-cli --cluster create`, waits until every node reports cluster_state:ok with all
#       16384 slots, then prints the seeds (redis://127.0.0.1:P1,redis://127.0.0.1:P2,...) and
#       writes them to DIR/seeds. With OWNER_PID, a watchdog stops the cluster once that process
#       is gone, so a killed CI run leaves nothing running.
#   .ci/redis-cluster.sh stop DIR
#       Kills the nodes (and the watchdog) and removes what start put in DIR, and DIR.
#
# Ports are drawn at random below the kernel's ephemeral range (outgoing connections do not take
# them) and drawn again when a node finds one taken. Nothing is persisted; node logs stay in DIR
# until stop, and are printed when start fails.
set -euo pipefail

MASTERS=3
TIMEOUT=20 # seconds, for each step
LOWEST_PORT=15000
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

usage() {
  echo "usage: $0 start DIR [OWNER_PID] | stop DIR" >&2
  exit 2
}

# Whether nothing accepts connections on 127.0.0.1:$1.
port_is_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

random_free_port() {
  local ceiling attempt port
  ceiling=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$ceiling" -gt $((LOWEST_PORT + 1000)) ] || ceiling=$((LOWEST_PORT + 1000))
  for attempt in $(seq 100); do
    port=$((LOWEST_PORT + (RANDOM * 32768 + RANDOM) % (ceiling - LOWEST_PORT)))
    if port_is_free "$port"; then
      echo "$port"
      return 0
    fi
  done
  echo "no free port between $LOWEST_PORT and $ceiling" >&2
  return 1
}

# Prints every node's log to stderr.
print_logs() {
  local log
  for log in "$1"/node-*/redis.log "$1"/create.log; do
    [ -f "$log" ] && { echo "--- $log" && cat "$log"; } >&2
  done
  return 0
}

fail() {
  echo "redis-cluster: $2" >&2
  print_logs "$1"
  stop "$1"
  exit 1
}

# start_node DIR PORT BUS_PORT: 0 once it answers PING, 1 when one of its ports was taken.
start_node() {
  local dir=$1 port=$2 bus=$3 pid waited=0
  mkdir -p "$dir"
  redis-server --port "$port" --cluster-port "$bus" --bind 127.0.0.1 \
    --save "" --appendonly no --daemonize no \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-require-full-coverage no --dir "$dir" \
    </dev/null >"$dir/redis.log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/redis.pid"
  until [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$dir/redis.pid"
      grep -q "Address already in use" "$dir/redis.log" && return 1
      fail "$(dirname "$dir")" "redis-server on port $port exited at start"
    fi
    waited=$((waited + 1))
    [ "$waited" -le $((TIMEOUT * 20)) ] ||
      fail "$(dirname "$dir")" "redis-server on port $port did not answer within ${TIMEOUT}s"
    sleep 0.05
  done
}

cluster_is_healthy() {
  local node info
  for node in "$@"; do
    info=$(redis-cli -h 127.0.0.1 -p "${node#127.0.0.1:}" cluster info 2>/dev/null | tr -d '\r') ||
      return 1
    grep -qx "cluster_state:ok" <<<"$info" || return 1
    grep -qx "cluster_slots_ok:16384" <<<"$info" || return 1
    grep -qx "cluster_known_nodes:$#" <<<"$info" || return 1
  done
}

start() {
  local dir=$1 owner=${2:-} i attempt port bus seeds waited=0
  if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
    echo "redis-cluster: $dir is not empty" >&2
    exit 1
  fi
  mkdir -p "$dir"
  local nodes=()
  for ((i = 0; i < MASTERS; i++)); do
    for attempt in $(seq 5); do
      port=$(random_free_port) && bus=$(random_free_port) || fail "$dir" "no free ports"
      [ "$port" != "$bus" ] || continue
      if start_node "$dir/node-$i" "$port" "$bus"; then
        nodes+=("127.0.0.1:$port")
        break
      fi
    done
    [ "${#nodes[@]}" -gt "$i" ] || fail "$dir" "node $i found its ports taken 5 times"
  done

  timeout "$TIMEOUT" redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    </dev/null >"$dir/create.log" 2>&1 || fail "$dir" "redis-cli --cluster create failed"
  until cluster_is_healthy "${nodes[@]}"; do
    waited=$((waited + 1))
    [ "$waited" -le $((TIMEOUT * 20)) ] || fail "$dir" "the cluster was not healthy within ${TIMEOUT}s"
    sleep 0.05
  done

  seeds=$(printf 'redis://%s,' "${nodes[@]}")
  seeds=${seeds%,}
  echo "$seeds" >"$dir/seeds"
  if [ -n "$owner" ]; then
    nohup bash -c 'while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 1; done; exec bash "$3" stop "$2"' \
      watchdog "$owner" "$dir" "$SELF" </dev/null >/dev/null 2>&1 &
    echo $! >"$dir/watchdog.pid"
  fi
  echo "$seeds"
}

# Kills the process in pid file $1 if it still is the command named $2.
kill_pid_file() {
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if [ "$pid" != "$$" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop() {
  local dir=$1 pid_file
  [ -d "$dir" ] || return 0
  kill_pid_file "$dir/watchdog.pid" bash
  for pid_file in "$dir"/node-*/redis.pid; do
    kill_pid_file "$pid_file" redis-server
  done
  rm -rf "$dir"/node-* "$dir/create.log" "$dir/seeds"
  rmdir "$dir" 2>/dev/null || echo "redis-cluster: left $dir: it holds files of others" >&2
}

case "${1:-}" in
start) [ $# -ge 2 ] && [ $# -le 3 ] || usage; start "$2" "${3:-}" ;;
stop) [ $# -eq 2 ] || usage; stop "$2" ;;
*) usage ;;
esac
