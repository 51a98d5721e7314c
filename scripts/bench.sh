#!/usr/bin/env bash
# Measures Quorum and writes bench-out/: raw outputs, one JSON file per measurement,
# results.json (everything) and RESULTS.md (tables; docs/BENCHMARKS.md is a checked-in copy of
# one run). Parts, in order:
#   1. crypto: mask PRG, client masking, discrete Gaussian sampler, DP encode/decode at 10M
#   3. audit log: durable appends/s, verification records/s
#   2. rounds over loopback mTLS (client/examples/loadgen.rs, a real aggregator process):
#      secure vs plain, aggregator memory against the number of sites and the model size
#      (d up to 100M with 10 sites and 1B with 3, where the memory allows)
#   6. Flower's SecAgg+ at the same n and d, right after Quorum's secure round
#   4. training throughput, tch vs PyTorch eager, same threads and batch
#   5. utility against DP noise: the demo federation at several noise multipliers
#   7. record-level DP: a DP-SGD step against a plain step (time, peak memory), and the 4-site
#      non-IID federation at record-level ε = ∞, 8 and 2 at equal tokens
# Settings come from the environment (defaults in brackets):
#   OUT [bench-out]  BIN [target/release]  QUICK [0: full sizes; 1: small sizes, a smoke run]
#   PARTS [crypto audit load flower train dp dpsgd]  FLOWER [1]  THREADS [2]
#   KEEP [0; 1: keep OUT's earlier results, e.g. to redo some PARTS]
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench-out}
BIN=${BIN:-target/release}
QUICK=${QUICK:-0}
PARTS=${PARTS:-crypto audit load flower train dp dpsgd}
FLOWER=${FLOWER:-1}
THREADS=${THREADS:-2}
export PATH="$PWD/.venv/bin:$PATH"

if [ "$QUICK" = 1 ]; then
  D_BIG=1000000 D_SMALL=200000 D_HUGE=4000000 D_GIANT=20000000 N_LIST="4 8" N_BIG=8 ROUNDS=2
  TRAIN_PRESETS="tiny" DP_NOISES="0 1.0" DP_ROUNDS=2 DP_STEPS=5 AUDIT_N=500
  DPSGD_PRESETS="tiny" RECORD_BATCHES="8" RECORD_EPSILONS="8"
else
  D_BIG=10000000 D_SMALL=1000000 D_HUGE=100000000 D_GIANT=1000000000 N_LIST="10 25 50 100" N_BIG=50
  ROUNDS=2
  TRAIN_PRESETS="tiny 75m" DP_NOISES="0 0.3 1.0" DP_ROUNDS=4 DP_STEPS=20 AUDIT_N=5000
  DPSGD_PRESETS="tiny 75m" RECORD_BATCHES="8 32" RECORD_EPSILONS="8 2"
fi

has_part() { [[ " $PARTS " == *" $1 "* ]]; }
log() { echo "== $(date +%H:%M:%S) $*" >&2; }

[ "${KEEP:-0}" = 1 ] || rm -rf "$OUT"
mkdir -p "$OUT"/{raw,load,train,dp,dpsgd,record,tmp}
started=$(date +%s)

trap 'rm -rf "$OUT/tmp"' EXIT

log "building (release)"
cargo build --release --bins
cargo build --release -p quorum-crypto --example prg_throughput
cargo build --release -p quorum-audit --example audit_throughput
cargo build --release -p quorum-client --example loadgen --example train_throughput
cargo test --release -p quorum-crypto --test dp_throughput --no-run

python3 - "$OUT/machine.json" "$QUICK" <<'PY'
import json, os, platform, subprocess, sys, time
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
json.dump({
    "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    "cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1),
    "kernel": platform.release(), "commit": sh("git", "rev-parse", "--short", "HEAD"),
    "dirty": sh("git", "status", "--porcelain") not in ("", "unknown"),
    "rustc": sh("rustc", "--version"), "quick": sys.argv[2] == "1",
    "loadavg_at_start": [float(x) for x in open("/proc/loadavg").read().split()[:3]],
}, open(sys.argv[1], "w"), indent=1)
PY

if has_part crypto; then
  log "1. crypto: PRG and masking (10M elements)"
  "$BIN/examples/prg_throughput" | tee "$OUT/raw/prg.txt"
  log "1. crypto: sampler and DP encode/decode (10M)"
  cargo test --release -p quorum-crypto --test dp_throughput -- --ignored --nocapture --test-threads 1 \
    2>/dev/null | tee "$OUT/raw/dp.txt"
fi

if has_part audit; then
  log "3. audit log: $AUDIT_N durable appends, then verification"
  "$BIN/examples/audit_throughput" "$AUDIT_N" "$OUT/tmp" | tee "$OUT/raw/audit.txt"
fi

# One federation of synthetic sites against a real aggregator; keeps result.json, the logs and
# the aggregator's audit log (for the phase timings), drops the bulky files.
loadgen() { # name args...
  local name=$1 dir="$OUT/load/$1"
  shift
  log "2. load: $name ($*)"
  "$BIN/examples/loadgen" --aggregator "$BIN/quorum-aggregator" --out "$dir" "$@" \
    >"$OUT/load/$name.json" 2>"$OUT/load/$name.log"
  cat "$OUT/load/$name.json"
  "$BIN/quorum-aggregator" audit --log "$dir/aggregator-state/audit" export >"$dir/audit.jsonl"
  rm -rf "$dir/pki" "$dir/sites" "$dir/initial.safetensors" "$dir/aggregator-state/checkpoints"
}

flower() {
  log "6. Flower SecAgg+ at n=10, d=$D_BIG"
  CLIENTS=10 DIM=$D_BIG ROUNDS=$ROUNDS OUT_JSON="$OUT/flower.json" LOG="$OUT/raw/flower.log" \
    bench/flower/run.sh
  cat "$OUT/flower.json"
}

if has_part load; then
  loadgen secure-n10 --sites 10 --dim "$D_BIG" --rounds "$ROUNDS"
  # Flower has no DP: compare it with Quorum's secure round without noise, back to back.
  if has_part flower && [ "$FLOWER" = 1 ]; then
    loadgen nodp-n10 --sites 10 --dim "$D_BIG" --rounds "$ROUNDS" --no-dp
    flower
  fi
  loadgen plain-n10 --sites 10 --dim "$D_BIG" --rounds "$ROUNDS" --plain
  # Memory against the number of sites at the large size: one round is enough for a peak.
  loadgen "secure-n$N_BIG" --sites "$N_BIG" --dim "$D_BIG" --rounds 1
  for n in $N_LIST; do
    loadgen "curve-n$n" --sites "$n" --dim "$D_SMALL" --rounds "$ROUNDS"
  done
  # The large models only if this machine has the memory for them: the aggregator's and each
  # site's peak are lines in d through the two largest runs so far; the first site count in
  # the list that fits (with 5 % to spare) runs, else the run is skipped and the reason kept.
  big_model() { # name d n...
    local name=$1 d=$2 plan n need avail
    shift 2
    plan=$(python3 - "$d" "$smaller" "$larger" "$@" <<'PY'
import json, sys
d, small, large, *ns = sys.argv[1:]
a, b = (json.load(open(p)) for p in (small, large))
def at(key):
    slope = (b[key] - a[key]) / (b["dim"] - a["dim"])
    return b[key] + slope * (int(d) - b["dim"])
avail = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable")) / 1024
for n in map(int, ns):
    need = 1.05 * (at("aggregator_peak_rss_mib") + n * at("site_peak_rss_mib_each"))
    if need < avail:
        break
else:
    n = 0
print(n, int(need), int(avail))
PY
)
    read -r n need avail <<<"$plan"
    if [ "$n" -gt 0 ]; then
      loadgen "$name-n$n" --sites "$n" --dim "$d" --rounds 1
      smaller=$larger larger="$OUT/load/$name-n$n.json"
    else
      log "2. load: skipping d=$d: needs about $need MiB, $avail MiB available"
      echo "{\"skipped\": true, \"dim\": $d, \"need_mib\": $need, \"available_mib\": $avail}" \
        >"$OUT/load/skipped-$name.json"
    fi
  }
  smaller="$OUT/load/curve-n${N_LIST%% *}.json" larger="$OUT/load/secure-n10.json"
  big_model huge "$D_HUGE" 10 3
  big_model giant "$D_GIANT" 3 2
elif has_part flower && [ "$FLOWER" = 1 ]; then
  flower
fi

if has_part train; then
  for preset in $TRAIN_PRESETS; do
    if [ "$preset" = tiny ]; then steps=20 warmup=3; else steps=4 warmup=1; fi
    args=(--preset "$preset" --batch 8 --seq 128 --threads "$THREADS" --steps "$steps" --warmup "$warmup")
    log "4. training: $preset, tch"
    python3 bench/peak_rss.py "$BIN/examples/train_throughput" "${args[@]}" | tee "$OUT/train/tch-$preset.json"
    log "4. training: $preset, PyTorch eager"
    python3 bench/peak_rss.py .venv/bin/python bench/torch_reference.py "${args[@]}" |
      tee "$OUT/train/torch-$preset.json"
  done
fi

if has_part dp; then
  port=7470
  for noise in $DP_NOISES; do
    log "5. utility: demo federation, noise multiplier $noise ($DP_ROUNDS rounds x $DP_STEPS steps)"
    if [ "$noise" = 0 ]; then dp=off nm=1.0; else dp=on nm=$noise; fi
    if ! OUT="$OUT/dp/noise-$noise" BIN=$BIN ROUNDS=$DP_ROUNDS STEPS=$DP_STEPS NOISE=$nm DP=$dp RECORD_DP=off PORT=$port \
      scripts/demo.sh >"$OUT/dp/noise-$noise.log" 2>&1; then
      # The federation may have finished and only a later step of the demo failed (its report
      # or audit checks): the measurement stands if the aggregator printed its final summary.
      if grep -q '^final ' "$OUT/dp/noise-$noise/aggregator-report.txt" 2>/dev/null; then
        echo "warning: the demo at noise $noise failed after the federation finished; using its results" >&2
        tail -3 "$OUT/dp/noise-$noise.log" >&2
      else
        echo "demo at noise $noise failed; last lines:" >&2
        tail -20 "$OUT/dp/noise-$noise.log" >&2
        exit 1
      fi
    fi
    rm -rf "$OUT/dp/noise-$noise/aggregator-state/checkpoints" "$OUT/dp/noise-$noise/pki"
    port=$((port + 1))
  done
fi

if has_part dpsgd; then
  for preset in $DPSGD_PRESETS; do
    if [ "$preset" = tiny ]; then steps=10 warmup=2; else steps=2 warmup=1; fi
    for method in plain ghost micro-batch; do
      args=(--preset "$preset" --batch 8 --seq 128 --threads "$THREADS" --steps "$steps" --warmup "$warmup")
      [ "$method" = plain ] || args+=(--dpsgd "$method")
      log "7. DP-SGD step: $preset, $method"
      python3 bench/peak_rss.py "$BIN/examples/train_throughput" "${args[@]}" | tee "$OUT/dpsgd/$method-$preset.json"
    done
  done
  # Utility at equal tokens: every run trains each site on DP_ROUNDS × DP_STEPS × 8 sequences.
  # Without DP the batch is 8; with DP-SGD the expected batch B is a setting, so a run at B
  # takes 8/B as many steps, and its noise multiplier is the smallest that keeps the
  # record-level ε within the target over those steps (plan-record-dp).
  sequences=$((DP_ROUNDS * DP_STEPS * 8))
  run_record() { # name record_dp q sigma steps
    log "7. record-level utility: $1"
    OUT="$OUT/record/$1" BIN=$BIN SITES=alpha,beta,gamma,delta ROUNDS=$DP_ROUNDS STEPS=$5 DP=off \
      RECORD_DP=$2 RECORD_Q=$3 RECORD_SIGMA=$4 RECORD_MAX_EPSILON=1000 PORT=7480 \
      scripts/demo.sh >"$OUT/record/$1.log" 2>&1 ||
      grep -q '^final ' "$OUT/record/$1/aggregator-report.txt"
    rm -rf "$OUT/record/$1/aggregator-state/checkpoints" "$OUT/record/$1/pki"
  }
  echo "{\"epsilon\": null, \"batch\": 8, \"steps\": $((DP_ROUNDS * DP_STEPS))}" >"$OUT/record/eps-inf-b8.json"
  run_record eps-inf-b8 off 0 0 "$DP_STEPS"
  for eps in $RECORD_EPSILONS; do
    for batch in $RECORD_BATCHES; do
      steps=$((sequences / batch / DP_ROUNDS))
      plan=$("$BIN/quorum-client" plan-record-dp --data builtin:clinical --expected-batch "$batch" \
        --steps $((steps * DP_ROUNDS)) --epsilon "$eps" 2>/dev/null)
      q=$(sed -n 's/^sampling_rate = //p' <<<"$plan")
      sigma=$(sed -n 's/^noise_multiplier = //p' <<<"$plan")
      echo "{\"epsilon\": $eps, \"batch\": $batch, \"steps\": $((steps * DP_ROUNDS)), \"q\": $q, \"sigma\": $sigma}" \
        >"$OUT/record/eps-$eps-b$batch.json"
      run_record "eps-$eps-b$batch" on "$q" "$sigma" "$steps"
    done
  done
fi

log "collecting"
PLOT_PY=python3
if [ ! -x bench/.venv/bin/python ]; then
  { python3 -m venv bench/.venv && bench/.venv/bin/pip install --quiet matplotlib; } \
    >"$OUT/raw/matplotlib-install.log" 2>&1 || rm -rf bench/.venv
fi
[ -x bench/.venv/bin/python ] && PLOT_PY=bench/.venv/bin/python
elapsed=$(($(date +%s) - started))
"$PLOT_PY" bench/collect.py "$OUT" --elapsed "$elapsed"
log "done in ${elapsed}s: $OUT/RESULTS.md"
