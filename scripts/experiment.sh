#!/usr/bin/env bash
# The seed paper's comparison at small scale: 4 non-IID sites (built-in corpora of different
# flavours) trained federated vs. the same model trained centrally on the union of their data,
# at equal tokens and optimizer steps (centralized batch = sites × local batch). Then FedAvg vs
# Nesterov as the outer optimizer. Writes experiment-out/RESULTS.md and loss plots.
#   ROUNDS [8]  STEPS [40]  BIN [target/release]
set -euo pipefail
ROUNDS=${ROUNDS:-8}
STEPS=${STEPS:-40}
BIN=${BIN:-target/release}
OUT=${OUT:-experiment-out}
SITES=alpha,beta,gamma,delta
BATCH=8
mkdir -p "$OUT"

final_loss() { # mean validation loss of the final global model, from the aggregator's state
  python3 -c 'import json,sys; h=json.load(open(sys.argv[1]))["history"]; r=h[-1]["reports"]; print(sum(x["val_loss_before"] for x in r.values())/len(r))' "$1/aggregator-state/state.json"
}

run_federated() { # name outer lr momentum
  echo "== federated ($1)"
  OUT="$OUT/$1" SITES=$SITES ROUNDS=$ROUNDS STEPS=$STEPS DP=off RECORD_DP=off OUTER=$2 OUTER_LR=$3 MOMENTUM=$4 \
    BATCH=$BATCH BIN=$BIN PORT=${PORT:-7460} scripts/demo.sh >"$OUT/$1.log" 2>&1
}

run_federated fedavg fedavg 1.0 0
run_federated nesterov nesterov 0.7 0.7

echo "== centralized baseline"
"$BIN/quorum-client" train --init "$OUT/fedavg/initial.safetensors" \
  --data builtin:clinical --data builtin:finance --data builtin:academic --data builtin:legal \
  --steps $((ROUNDS * STEPS)) --batch-size $((BATCH * 4)) --seq-len 128 --lr 3e-3 \
  --warmup $((STEPS / 2)) --eval-every "$STEPS" --curve "$OUT/centralized.json" 2>"$OUT/centralized.log"
central=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[-1]["val_loss"])' "$OUT/centralized.json")

for run in fedavg nesterov; do
  "$BIN/quorum-aggregator" report --state "$OUT/$run/aggregator-state" --out "$OUT/$run/report" \
    --baseline "$OUT/centralized.json" >/dev/null
done
fedavg=$(final_loss "$OUT/fedavg")
nesterov=$(final_loss "$OUT/nesterov")
tokens=$((ROUNDS * STEPS * BATCH * 4 * 128))
{
  echo "| run | final validation loss | vs centralized |"
  echo "|---|---|---|"
  python3 - "$central" "$fedavg" "$nesterov" <<'PY'
import sys
c, f, n = map(float, sys.argv[1:])
print(f"| centralized (batch 32, same steps) | {c:.4f} | — |")
print(f"| federated, FedAvg (lr 1.0) | {f:.4f} | {100*(f-c)/c:+.1f} % |")
print(f"| federated, Nesterov (lr 0.7, μ 0.7) | {n:.4f} | {100*(n-c)/c:+.1f} % |")
PY
  echo
  echo "4 sites (clinical, finance, academic, legal), tiny preset, $ROUNDS rounds × $STEPS local steps,"
  echo "local batch $BATCH × 128 tokens; $tokens training tokens in every run. Secure aggregation on, DP off."
} | tee "$OUT/RESULTS.md"
