#!/usr/bin/env bash
# Flower SecAgg+ comparison: installs flwr (with its simulation engine) and numpy from PyPI into
# bench/flower/.venv on first use, then runs secagg_bench.py. Writes one JSON object to OUT_JSON
# (default: stdout). When Flower cannot be installed or run, the JSON says "not measured" and
# why, and the script still exits 0 so the rest of the benchmark goes on.
#   CLIENTS [10]  DIM [10000000]  ROUNDS [2]  FLWR_VERSION [1.42.0]  OUT_JSON [-]
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VENV="$HERE/.venv"
CLIENTS=${CLIENTS:-10}
DIM=${DIM:-10000000}
ROUNDS=${ROUNDS:-2}
FLWR_VERSION=${FLWR_VERSION:-1.42.0}
OUT_JSON=${OUT_JSON:--}
LOG=${LOG:-/dev/stderr}

emit() {
  if [[ "$OUT_JSON" == - ]]; then echo "$1"; else echo "$1" >"$OUT_JSON"; fi
}

not_measured() {
  echo "Flower not measured: $1" >&2
  emit "$(python3 -c 'import json,sys; print(json.dumps({"impl": "flower-secaggplus", "status": "not measured", "reason": sys.argv[1]}))' "$1")"
  exit 0
}

marker="$VENV/.flwr-$FLWR_VERSION"
if [[ ! -f "$marker" ]]; then
  echo "== installing flwr[simulation]==$FLWR_VERSION and numpy into $VENV" >&2
  { python3 -m venv "$VENV" &&
    "$VENV/bin/pip" install --quiet --upgrade pip &&
    "$VENV/bin/pip" install --quiet "flwr[simulation]==$FLWR_VERSION" numpy; } >>"$LOG" 2>&1 ||
    not_measured "pip could not install flwr[simulation]==$FLWR_VERSION (see $LOG)"
  touch "$marker"
fi

result=$(mktemp)
trap 'rm -f "$result"' EXIT
if ! "$VENV/bin/python" "$HERE/secagg_bench.py" --clients "$CLIENTS" --dim "$DIM" --rounds "$ROUNDS" \
  >"$result" 2>>"$LOG"; then
  not_measured "secagg_bench.py failed at n=$CLIENTS, d=$DIM (see $LOG)"
fi
line=$(grep '^{' "$result" | tail -1 || true)
[[ -n "$line" ]] || not_measured "secagg_bench.py printed no result (see $LOG)"
emit "$line"
