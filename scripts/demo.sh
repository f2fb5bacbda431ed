#!/usr/bin/env bash
# Weft's demo, end to end, on a fresh Debian 12 machine as root:
#   1. scripts/setup.sh (system packages + .venv with Weft)
#   2. a private internet of network namespaces: server 198.51.100.1, visitor 198.51.100.20,
#      tunnel host 203.0.113.10 behind NAT
#   3. a web service on the tunnel host's 127.0.0.1:8000, `weft server` on the server host,
#      `weft tunnel ... tcp://127.0.0.1:8000 tcp://198.51.100.1:18000` on the tunnel host
#   4. the visitor fetches http://198.51.100.1:18000/ with curl
# Everything is torn down at the end, on failure and on Ctrl-C. Exits non-zero unless the visitor
# got the page. Only addresses inside the namespaces it creates are ever contacted.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${WEFT_VENV:-$PWD/.venv}

[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 2; }

echo "==> setting up the machine (scripts/setup.sh)"
bash scripts/setup.sh

child=""
cleanup() {
    # The demo tears its lab down itself; this catches a demo that was killed outright, by
    # removing lab namespaces whose creating process is gone (never another live lab's).
    "$VENV/bin/python" -c 'import sys; sys.path.insert(0, "tests"); import netns; netns.cleanup_stale_labs()' \
        || true
}
forward() {
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null || true
}
trap cleanup EXIT
trap forward INT TERM HUP

"$VENV/bin/python" scripts/demo.py "$@" &
child=$!
status=0
wait "$child" || status=$?
# `wait` returns early when a trapped signal arrives: wait for the demo to finish tearing down.
while kill -0 "$child" 2>/dev/null; do
    wait "$child" || status=$?
done
exit "$status"
