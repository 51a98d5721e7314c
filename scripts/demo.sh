#!/usr/bin/env bash
# Runs a whole federation on loopback: a fresh PKI, a signed client release, an aggregator and
# several sites with different (non-IID) built-in corpora, secure aggregation and distributed DP.
# Ends with the aggregator's report, each site's summary, a loss plot, and every audit log
# verified against its node's pinned audit key and the heads the other side witnessed. Settings come from the environment (defaults in brackets):
#   OUT [demo-out]  BIN [target/release]  SITES [alpha,beta,gamma]  ROUNDS [6]  STEPS [40]
#   PRESET [tiny]  NOISE [0.001]  DP [on]  OUTER [fedavg]  OUTER_LR [1.0]  MOMENTUM [0.7]
#   BATCH [8]  SEQ [128]  LR [3e-3]  PORT [7443]  PHASE_TIMEOUT [600]
#   RECORD_DP [on]: each site runs DP-SGD, protecting each training sequence at a record-level
#   ε it caps itself; RECORD_Q [5e-4] (Poisson sampling rate), RECORD_SIGMA [0.6] (noise
#   multiplier), RECORD_CLIP [1.0], RECORD_MAX_EPSILON [8]
set -euo pipefail

OUT=${OUT:-demo-out}
BIN=${BIN:-target/release}
SITES=${SITES:-alpha,beta,gamma}
ROUNDS=${ROUNDS:-6}
STEPS=${STEPS:-40}
PRESET=${PRESET:-tiny}
NOISE=${NOISE:-0.001}
PORT=${PORT:-7443}
DP=${DP:-on}
OUTER=${OUTER:-fedavg}
OUTER_LR=${OUTER_LR:-1.0}
MOMENTUM=${MOMENTUM:-0.7}
BATCH=${BATCH:-8}
SEQ=${SEQ:-128}
LR=${LR:-3e-3}
PHASE_TIMEOUT=${PHASE_TIMEOUT:-600}
RECORD_DP=${RECORD_DP:-on}
RECORD_Q=${RECORD_Q:-5e-4}
RECORD_SIGMA=${RECORD_SIGMA:-0.6}
RECORD_CLIP=${RECORD_CLIP:-1.0}
RECORD_MAX_EPSILON=${RECORD_MAX_EPSILON:-8}
if [ "$DP" = on ]; then DP_ENABLED=true; else DP_ENABLED=false; fi
if [ "$OUTER" = fedavg ] || [ "$OUTER" = fedadam ]; then MOMENTUM_LINE=""; else MOMENTUM_LINE="momentum = $MOMENTUM"; fi
FLAVOURS=(clinical finance academic legal)

AGG="$BIN/quorum-aggregator"
CLIENT="$BIN/quorum-client"
rm -rf "$OUT"
mkdir -p "$OUT/logs"
IFS=, read -r -a site_list <<<"$SITES"

echo "== PKI for federation 'demo'; each of ${#site_list[@]} sites makes its own key and sends a request"
"$AGG" pki init --federation demo --out "$OUT/pki" >/dev/null
for site in "${site_list[@]}"; do
  # At the site: the key stays in its folder (0600); only site.csr goes to the authority.
  "$CLIENT" keygen --federation demo --site "$site" --out "$OUT/sites/$site" >/dev/null
  # At the authority: check the request, hand back site.pem and ca.pem.
  "$AGG" pki sign --ca "$OUT/pki/ca" --csr "$OUT/sites/$site/site.csr" --out "$OUT/sites/$site"
done

echo "== audit keys: each node makes its own; auditors pin the fingerprints"
AGG_AUDIT_KEY=$("$AGG" audit keygen --out "$OUT/aggregator-state/audit.key" 2>/dev/null)
echo "aggregator: $AGG_AUDIT_KEY"
declare -A SITE_AUDIT_KEY
for site in "${site_list[@]}"; do
  SITE_AUDIT_KEY[$site]=$("$CLIENT" audit keygen --out "$OUT/$site-state/audit.key" 2>/dev/null)
  echo "$site: ${SITE_AUDIT_KEY[$site]}"
done

echo "== signing the client release"
"$AGG" release keygen --out "$OUT/release.key" >/dev/null
"$AGG" release sign --binary "$CLIENT" --version "$("$CLIENT" --version | awk '{print $2}')" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" --key "$OUT/release.key"
VERSION=$("$CLIENT" --version | awk '{print $2}')
PUBKEY=$(cat "$OUT/release.key.pub")

echo "== initial model ($PRESET)"
"$CLIENT" init-model --preset "$PRESET" --out "$OUT/initial.safetensors"

cat >"$OUT/federation.toml" <<TOML
[federation]
name = "demo"
rounds = $ROUNDS
min_clients = ${#site_list[@]}
max_clients = ${#site_list[@]}

[server]
listen = "127.0.0.1:$PORT"
ca = "pki/ca/ca.pem"
cert = "pki/server/server.pem"
key = "pki/server/server.key"
crl = "pki/ca/crl.pem"
state_dir = "aggregator-state"

[model]
initial_checkpoint = "initial.safetensors"

[training]
local_steps = $STEPS
batch_size = $BATCH
seq_len = $SEQ
lr = $LR
warmup_steps = $((STEPS / 2))
total_steps = $((ROUNDS * STEPS))
reset_local_optimizer = false

[outer]
optimizer = "$OUTER"
lr = $OUTER_LR
$MOMENTUM_LINE

[secure_aggregation]
enabled = true
modulus_bits = 24
corrupt_fraction = 0.0
dropout_fraction = 0.0
phase_timeout_secs = $PHASE_TIMEOUT

[privacy]
enabled = $DP_ENABLED
clip_norm = 5.0
noise_multiplier = $NOISE
delta = 1e-6

[releases]
trusted_keys = ["$PUBKEY"]
allowed_versions = ["$VERSION"]
require_attestation = true
TOML
"$AGG" policy check --config "$OUT/federation.toml"

i=0
for site in "${site_list[@]}"; do
  flavour=${FLAVOURS[$((i % ${#FLAVOURS[@]}))]}
  cat >"$OUT/$site.toml" <<TOML
[site]
federation = "demo"
name = "$site"

[policy]
# Three sites cannot buy strong privacy from distributed noise; this cap is for the demo only.
# The privacy that means something here is record-level, in [record_dp] below.
max_epsilon = 1e9
delta = 1e-6
min_cohort = 2
require_secure_aggregation = true
require_dp = $DP_ENABLED
# share_metrics stays at its default, false: no site's own losses leave it. The report and loss
# plot come from the losses every site puts into its masked update, whose sum is all the
# aggregator sees (sum_metrics, default true).

[data]
path = "builtin:$flavour"

[storage]
state_dir = "$site-state"
TOML
  if [ "$RECORD_DP" = on ]; then
    cat >>"$OUT/$site.toml" <<TOML

[record_dp]
# DP-SGD on every local step: each training sequence (the privacy unit) is sampled with
# probability sampling_rate, its gradient clipped to clip_norm and Gaussian noise added by this
# site, so its record-level ε holds whatever the aggregator and the other sites do.
unit = "sequence"
sampling_rate = $RECORD_Q
noise_multiplier = $RECORD_SIGMA
clip_norm = $RECORD_CLIP
max_epsilon = $RECORD_MAX_EPSILON
delta = 1e-6
TOML
  fi
  i=$((i + 1))
done

echo "== starting the aggregator on 127.0.0.1:$PORT"
"$AGG" serve --config "$OUT/federation.toml" 2> >(tee "$OUT/logs/aggregator.log" >&2) >"$OUT/aggregator-report.txt" &
AGG_PID=$!
trap 'kill $AGG_PID ${CLIENT_PIDS:-} 2>/dev/null || true' EXIT
sleep 1

CLIENT_PIDS=""
i=0
for site in "${site_list[@]}"; do
  "$CLIENT" run --bundle "$OUT/sites/$site" --config "$OUT/$site.toml" --server "127.0.0.1:$PORT" \
    --seed "$i" >"$OUT/logs/$site.out" 2>"$OUT/logs/$site.log" &
  CLIENT_PIDS="$CLIENT_PIDS $!"
  i=$((i + 1))
done

wait "$AGG_PID"
for pid in $CLIENT_PIDS; do wait "$pid"; done
trap - EXIT

echo
cat "$OUT/aggregator-report.txt"
for site in "${site_list[@]}"; do
  echo "$site: $(cat "$OUT/logs/$site.out")"
  grep -h "verified\|joined" "$OUT/logs/aggregator.log" | grep "$site" | head -1 || true
done

echo
echo "== report"
"$AGG" report --state "$OUT/aggregator-state" --out "$OUT/report"

echo
echo "== audit logs, each checked against its pinned key and the heads the other side witnessed"
witnesses=()
for site in "${site_list[@]}"; do witnesses+=(--witness "$OUT/$site-state/audit"); done
printf 'aggregator: '
"$AGG" audit --log "$OUT/aggregator-state/audit" verify --trusted-key "$AGG_AUDIT_KEY" "${witnesses[@]}"
for site in "${site_list[@]}"; do
  printf '%s: ' "$site"
  "$CLIENT" audit --log "$OUT/$site-state/audit" verify --trusted-key "${SITE_AUDIT_KEY[$site]}" \
    --witness "$OUT/aggregator-state/audit"
done
"$AGG" audit --log "$OUT/aggregator-state/audit" export >"$OUT/aggregator-audit.jsonl"
"$CLIENT" audit --log "$OUT/${site_list[0]}-state/audit" reconcile --aggregator-export "$OUT/aggregator-audit.jsonl"
echo
echo "round 1 as the aggregator's audit log tells it:"
"$AGG" audit --log "$OUT/aggregator-state/audit" list --round 1
