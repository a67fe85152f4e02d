#!/usr/bin/env bash
# Login abuse figures for docs/security.md (issue 14): memory under a login flood, the rate a
# brute force achieves, and memory after the 100 logins `natter bench` does.
#
#   cargo build --release -p natter && bench/auth_abuse.sh [target/release/natter]
# (a debug build gives the same memory and throttle figures; its hashes are only slower)
#
# Starts `natter serve` (SQLite in a temp dir) on 127.0.0.1:18731 and drives it with curl.
set -euo pipefail
BIN=${1:-target/release/natter}
PORT=18731
URL=http://127.0.0.1:$PORT
DIR=$(mktemp -d)
trap 'kill $PID 2>/dev/null || true; rm -rf "$DIR"' EXIT
"$BIN" serve --bind 127.0.0.1:$PORT --data-dir "$DIR" --log-format json >"$DIR/log" 2>&1 &
PID=$!
until curl -fs $URL/api/health >/dev/null; do sleep 0.1; done
rss() { awk '/^VmRSS/ {print int($2/1024)}' /proc/$PID/status; }
hwm() { awk '/^VmHWM/ {print int($2/1024)}' /proc/$PID/status; }
login() { # username password [source address]
  curl -s -o /dev/null -w '%{http_code}\n' ${3:+--interface $3} -H 'content-type: application/json' \
    -d "{\"username\":\"$1\",\"password\":\"$2\"}" $URL/api/auth/login
}
export -f login; export URL
idle=$(rss)
echo "idle RSS: ${idle} MiB"

# 1. Login flood: unknown users, N at once, each from its own source address (so that the
#    throttle doesn't answer them first and they all reach the password pool).
for n in 32 256; do
  seq 1 $n | xargs -P $n -I{} bash -c 'login flood-{}-$RANDOM wrong-password 127.0.$(( {} / 250 + 1 )).$(( {} % 250 + 2 ))' \
    | sort | uniq -c | tr '\n' ' '
  echo "<- statuses of $n concurrent unknown-user logins; RSS now $(rss) MiB, peak $(hwm) MiB (idle ${idle})"
done

# 2. Brute force: one known user, wrong passwords as fast as one client can send them, 3 s.
curl -s -o /dev/null -H 'content-type: application/json' -d '{"username":"victim","password":"victim-password"}' $URL/api/auth/register
end=$(( $(date +%s%N) + 3000000000 )); : >"$DIR/bf"
while [ "$(date +%s%N)" -lt $end ]; do login victim "guess-$RANDOM" 127.0.0.2 >>"$DIR/bf"; done
echo "brute force, 3 s from one address: $(sort "$DIR/bf" | uniq -c | tr '\n' ' ')(401 = a password actually tried)"
echo "meanwhile the real user from another address: HTTP $(login victim victim-password 127.0.0.3)"

# 3. What `natter bench` does: register and log in 100 users, 8 at a time.
before=$(rss)
seq 1 100 | xargs -P 8 -I{} bash -c 'curl -s -o /dev/null -H "content-type: application/json" \
  -d "{\"username\":\"bench-{}\",\"password\":\"bench-password\"}" $URL/api/auth/register; login bench-{} bench-password' \
  | sort | uniq -c | tr '\n' ' '
echo "<- 100 registrations + logins; RSS $(rss) MiB (before ${before}, fresh server ${idle}), peak $(hwm) MiB"
