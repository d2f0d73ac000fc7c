#!/usr/bin/env bash
# Three tiergate instances on the local Redis and Postgres share one set of limits.
#
#   examples/many-instances.sh
#
# Needs Redis on 127.0.0.1:6379 and Postgres on 127.0.0.1:5432 (user postgres, trust auth), as
# this project's machines run them. It builds tiergate, starts the mock upstream and three
# instances on a fresh database and a fresh Redis key prefix, creates a workspace on a tier of
# 2 requests/s (burst 2), sends 30 requests round-robin across the instances (one every 100 ms),
# prints what each
# admitted, shows that every instance reports the same month usage, and cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."

PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS=${REDIS:-redis://127.0.0.1:6379}
DB_NAME="tiergate_example_$$"
PREFIX="example$$"
ADMIN="example-admin-token-$$-0123456789"
PORTS=(8081 8082 8083)
MOCK_PORT=9091
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"

for cmd in curl psql redis-cli; do
  command -v "$cmd" >/dev/null || { echo "needs $cmd" >&2; exit 1; }
done
redis-cli -u "$REDIS" ping >/dev/null || { echo "Redis at $REDIS does not answer" >&2; exit 1; }
psql "$PG/postgres" -qc 'select 1' >/dev/null || { echo "Postgres at $PG does not answer" >&2; exit 1; }

echo "== building tiergate (release)"
cargo build --release --quiet
BIN="$CARGO_TARGET_DIR/release/tiergate"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $DB_NAME" >/dev/null 2>&1 || true
  redis-cli -u "$REDIS" --scan --pattern "*$PREFIX*" | xargs -r redis-cli -u "$REDIS" DEL >/dev/null
}
trap cleanup EXIT

psql "$PG/postgres" -qc "CREATE DATABASE $DB_NAME" >/dev/null
DATABASE="$PG/$DB_NAME"

wait_for() { # URL
  for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "nothing answers at $1" >&2; exit 1
}

"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" >/dev/null 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$MOCK_PORT/mock/requests"

for port in "${PORTS[@]}"; do
  TIERGATE_LOG=warn "$BIN" serve --listen "127.0.0.1:$port" \
    --upstream "http://127.0.0.1:$MOCK_PORT" --admin-token "$ADMIN" \
    --database "$DATABASE" --redis "$REDIS" --redis-prefix "$PREFIX" &
  PIDS+=($!)
done
for port in "${PORTS[@]}"; do wait_for "http://127.0.0.1:$port/healthz"; done
echo "== three instances on ports ${PORTS[*]}, database $DB_NAME, Redis prefix $PREFIX"

admin() { # METHOD PATH [BODY]
  curl -fsS -X "$1" "http://127.0.0.1:${PORTS[0]}/admin/v1$2" \
    -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' ${3:+-d "$3"}
}
admin PUT /tiers/example '{"requests_per_second": 2, "burst": 2, "tokens_per_month": 1000000}' >/dev/null
WS=$(admin POST /workspaces '{"name": "example", "tier": "example"}' | sed -E 's/.*"id":([0-9]+).*/\1/')
KEY=$(admin POST "/workspaces/$WS/keys" '{}' | sed -E 's/.*"key":"([^"]+)".*/\1/')
echo "== workspace $WS on tier 'example': 2 requests/s, burst 2"

BODY='{"model": "mistral-small-latest", "messages": [{"role": "user", "content": "Hello"}]}'
declare -A OK=() DENIED=()
started=$(date +%s.%N)
for i in $(seq 0 29); do
  port=${PORTS[$((i % 3))]}
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v1/chat/completions" \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d "$BODY")
  if [ "$code" = 200 ]; then OK[$port]=$(( ${OK[$port]:-0} + 1 )); else DENIED[$port]=$(( ${DENIED[$port]:-0} + 1 )); fi
  sleep 0.1
done
elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
total=0
for port in "${PORTS[@]}"; do
  echo "instance :$port  admitted ${OK[$port]:-0}  denied (429) ${DENIED[$port]:-0}"
  total=$(( total + ${OK[$port]:-0} ))
done
awk -v n="$total" -v e="$elapsed" 'BEGIN {
  printf "== %d of 30 admitted in %.1f s across the three instances: one limit of 2 at once and 2 a second allows %.1f;\n", n, e, 2 + 2 * e
  printf "   three instances each enforcing it alone would have admitted up to %.1f\n", 3 * (2 + 2 * e) }'

sleep 0.5
for port in "${PORTS[@]}"; do
  used=$(curl -fsS "http://127.0.0.1:$port/v1/limits" -H "Authorization: Bearer $KEY" \
    | sed -E 's/.*"tokens_this_month":([0-9]+).*/\1/')
  echo "instance :$port reports tokens_this_month = $used"
done
echo "== one set of limits: every instance sees the same month usage"
