#!/usr/bin/env bash
# REST fuzz: schemathesis generates requests from /api/openapi.json (valid and invalid bodies,
# paths, queries; NUL bytes included) against a real `natter serve` and fails on any 5xx.
#
#   scripts/fuzz-rest.sh                      # SQLite in a temp data dir
#   NATTER_FUZZ_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test scripts/fuzz-rest.sh
#
# Bounded: FUZZ_MAX_EXAMPLES cases per operation (default 100) and FUZZ_MAX_TIME seconds in all
# (default 150). Installs the pinned schemathesis with pip when it is missing. `make fuzz-rest`.
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-100}
MAX_TIME=${FUZZ_MAX_TIME:-150}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

if [ "$(python3 -m pip show schemathesis 2>/dev/null | sed -n 's/^Version: //p')" != "$SCHEMATHESIS_VERSION" ]; then
  python3 -m pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --quiet -p natter
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
dir=$(mktemp -d)
log="$dir/server.log"
db_args=()
schema=""
if [ -n "${NATTER_FUZZ_DATABASE_URL:-}" ]; then
  # A schema of this run's own, dropped at the end.
  schema="natter_fuzz_$$"
  psql -q "$NATTER_FUZZ_DATABASE_URL" -c "CREATE SCHEMA $schema"
  sep='?'; case "$NATTER_FUZZ_DATABASE_URL" in *\?*) sep='&';; esac
  db_args=(--database-url "$NATTER_FUZZ_DATABASE_URL${sep}options[search_path]=$schema")
fi

# Generous limits, so that the fuzzer meets validation rather than rate limits.
NATTER_LOG_FORMAT=pretty RUST_LOG=info target/debug/natter serve --bind "127.0.0.1:$port" --data-dir "$dir" \
  "${db_args[@]}" --messages-per-second 1000 --message-burst 1000 >"$log" 2>&1 &
pid=$!
cleanup() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$schema" ]; then psql -q "$NATTER_FUZZ_DATABASE_URL" -c "DROP SCHEMA $schema CASCADE" || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

for _ in $(seq 100); do
  curl -fs "$base/api/health" >/dev/null 2>&1 && break
  sleep 0.1
done

# A user, a token and a bot, so that authorized operations get past authentication.
json='{"username":"fuzzer","password":"fuzzer-password"}'
curl -fs "$base/api/auth/register" -H 'content-type: application/json' -d "$json" >/dev/null
token=$(curl -fs "$base/api/auth/login" -H 'content-type: application/json' -d "$json" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])')
curl -fs "$base/api/bots" -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"name":"Fuzz target","visibility":"public"}' >/dev/null

status=0
# From the temp dir, where schemathesis leaves its files.
(cd "$dir" && st run "$base/api/openapi.json" --url "$base" \
  --header "Authorization: Bearer $token" \
  --checks not_a_server_error \
  --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" \
  --generation-allow-x00 true --generation-database none --seed "${FUZZ_SEED:-14}" \
  --workers 1 --no-color --suppress-health-check all \
  --report junit --report-dir "$dir/report") || status=$?

if grep -q ' ERROR ' "$log"; then
  echo "--- server errors logged during the run:"
  grep ' ERROR ' "$log" | cut -c1-400 | head -20
  status=1
fi
exit $status
