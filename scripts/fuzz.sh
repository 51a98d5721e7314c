#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a fixed time; fails if any crashes.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]      (defaults: 60 s, every target)
#
# Each target starts from its seed corpus (fuzz/corpus/<target>) and its saved crashes
# (fuzz/regressions/<target>, replayed first, so a fixed bug stays fixed); new inputs go to
# fuzz/target/corpus/<target>, crashes to fuzz/artifacts/<target>. Logs: fuzz/target/logs.
# Settings from the environment: FUZZ_SANITIZER [address] (or none, about 2x faster),
# FUZZ_TIMEOUT [25] seconds one input may take, FUZZ_RSS_MB [2048] memory limit.
#
# Targets are built with -O, so that fuzz/Cargo.toml decides where debug assertions and overflow
# checks apply. cargo-fuzz passes nightly-only flags (-Zsanitizer, sancov passes) to rustc;
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them, so no nightly toolchain is needed.
set -euo pipefail

per_target=${1:-60}
shift || true
sanitizer=${FUZZ_SANITIZER:-address}
timeout_s=${FUZZ_TIMEOUT:-25}
rss_mb=${FUZZ_RSS_MB:-2048}

if ! [[ $per_target =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS_PER_TARGET [TARGET...]]  (seconds must be a positive integer)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: install it with 'cargo install cargo-fuzz'" >&2
  exit 2
fi

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1

if (($# > 0)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

mkdir -p target/logs
echo "== building the fuzz targets (sanitizer: $sanitizer)"
if ! cargo fuzz build -O --sanitizer "$sanitizer" >target/logs/build.log 2>&1; then
  tail -40 target/logs/build.log >&2
  exit 1
fi

# The last number matched by the extended regex $1 in file $2 (empty if none).
last_number() {
  grep -oE "$1" "$2" | tail -1 | grep -oE '[0-9]+$' || true
}

declare -A status execs rate corpus crash
failed=0
for t in "${targets[@]}"; do
  work="target/corpus/$t"
  mkdir -p "$work" "corpus/$t"
  dirs=("$work" "corpus/$t")
  [[ -d regressions/$t ]] && dirs+=("regressions/$t")
  args=(-max_total_time="$per_target" -timeout="$timeout_s" -rss_limit_mb="$rss_mb" -print_final_stats=1)
  [[ -f dicts/$t.dict ]] && args+=(-dict="dicts/$t.dict")
  log="target/logs/$t.log"
  echo "== $t: ${per_target}s"
  if cargo fuzz run -O --sanitizer "$sanitizer" "$t" "${dirs[@]}" -- "${args[@]}" >"$log" 2>&1; then
    status[$t]=ok
  else
    status[$t]=CRASH
    failed=1
  fi
  # A crash ends the run before the final stats: the last progress line has the count then.
  execs[$t]=$(last_number 'stat::number_of_executed_units: [0-9]+' "$log")
  [[ -n ${execs[$t]} ]] || execs[$t]=$(last_number '^#[0-9]+' "$log")
  rate[$t]=$(last_number 'stat::average_exec_per_sec: +[0-9]+' "$log")
  corpus[$t]=$(find "$work" -type f | wc -l)
  crash[$t]=$(grep -oE 'Test unit written to [^ ]+' "$log" | tail -1 | awk '{print $5}' || true)
  if [[ ${status[$t]} == CRASH ]]; then
    grep -E 'panicked at|ERROR: |SUMMARY' "$log" | head -5 | sed 's/^/   /'
  fi
done

echo
printf '%-16s %-6s %12s %10s %8s  %s\n' target status execs exec/s corpus crash-input
for t in "${targets[@]}"; do
  printf '%-16s %-6s %12s %10s %8s  %s\n' "$t" "${status[$t]}" "${execs[$t]:-?}" \
    "${rate[$t]:-?}" "${corpus[$t]}" "${crash[$t]:-}"
done
if ((failed)); then
  echo
  echo "A target crashed. Show the input with 'cargo fuzz fmt <target> <crash-input>' (in fuzz/," \
    "RUSTC_BOOTSTRAP=1), rerun it with 'cargo fuzz run -O <target> <crash-input>', and once fixed" \
    "copy it to fuzz/regressions/<target>/ so every later run replays it."
  exit 1
fi
