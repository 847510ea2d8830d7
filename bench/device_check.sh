#!/usr/bin/env bash
# The GPU check of kvcomp, run on the device machine from the repository root:
#
#   bench/device_check.sh [STAGE...]      (default: all)
#
# Stages, in the order given:
#   info      nvidia-smi, python3/torch/CUDA/nvcc/compute-sanitizer versions
#   build     the CUDA wheel: pip wheel --no-build-isolation (TORCH_CUDA_ARCH_LIST
#             "8.0;9.0a", MAX_JOBS=16) -> build/device_check/dist, $OUT/build.log;
#             its _C.abi3.so is unpacked into python/kvcomp/ (the tests run that
#             binary); then checks every op has a CUDA kernel
#   test      python3 -m pytest -m cuda -q tests -> $OUT/pytest-cuda.log
#   sanitize  compute-sanitizer memcheck and racecheck over the CUDA smoke tests
#             (tests/test_cuda.py -k smoke) -> $OUT/sanitize-{memcheck,racecheck}.log
#   bench     kvcomp-bench ops --device cuda --sweep -> $OUT/<date>-<gpu>.json, $OUT/bench.log
#   summary   stage results (this call and earlier calls on this machine), the
#             pytest and sanitizer tallies, the issue's bar from the newest JSON
#   all       info build test sanitize bench summary
#
# The device tool runs one command for at most 10 minutes, so a session splits
# the stages over calls (see bench/NOTES.md), e.g. "build test" then
# "sanitize bench". Build outputs (python/kvcomp/_C*.so, build/) and this
# script's records (build/device_check/) are ignored by git and stay on a warm
# machine between calls; a fresh machine needs the build stage again.
# A stage that cannot finish inside this call's budget (DEVICE_CHECK_BUDGET,
# default 570 s) is not started; the summary says which stages to run next.
#
# Environment: OUT (output folder; the device tool sets it), PYTHON (python3),
# KVCOMP_COMMIT (the sha to record in the JSON: the tree travels without .git),
# TORCH_CUDA_ARCH_LIST ("8.0;9.0a"), MAX_JOBS (16), PYTEST_WORKERS (8, if
# pytest-xdist is installed), *_TIMEOUT per stage (seconds).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
KEEP=build/device_check
OUT=${OUT:-$KEEP/out}
BUDGET=${DEVICE_CHECK_BUDGET:-570}
START=$SECONDS
mkdir -p "$OUT" "$KEEP"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
FAILED=()
DEFERRED=()
LAST_RC=0

die() { echo "device_check: ERROR: $*" >&2; exit 1; }
note() { echo "device_check: $*"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# record STAGE RC SECONDS: one line per stage run, kept across calls
record() {
  echo "$(date -u +%FT%TZ) $1 rc=$2 ${3}s" >>"$KEEP/status.txt"
  if [ "$2" != 0 ]; then FAILED+=("$1"); fi
}

# limit WANTED MINIMUM: seconds a stage may run, or 0 if fewer than MINIMUM are left
limit() {
  local avail=$(($(left) - 20))  # keep time for the summary
  if [ "$avail" -lt "$2" ]; then echo 0; elif [ "$avail" -lt "$1" ]; then echo "$avail"; else echo "$1"; fi
}

# run_logged STAGE SECONDS LOG CMD...: runs CMD under a time limit, output to LOG
# (and to $KEEP); records the exit status (124 = timed out). Never exits.
run_logged() {
  local stage=$1 secs=$2 log=$3 t0=$SECONDS rc=0
  shift 3
  note "$stage: $* (limit ${secs}s, log $(basename "$log"))"
  timeout --kill-after=20 "$secs" "$@" >"$log" 2>&1 || rc=$?
  [ "$rc" = 124 ] && echo "device_check: $stage: TIMED OUT after ${secs}s" | tee -a "$log"
  cap_log "$log"
  cp "$log" "$KEEP/"
  record "$stage" "$rc" $((SECONDS - t0))
  LAST_RC=$rc
  tail -n 5 "$log" | sed "s/^/  [$stage] /"
  return 0
}

# The device tool returns files of at most 16 MiB: keep the end of a long log.
cap_log() {
  local size
  size=$(stat -c %s "$1")
  if [ "$size" -gt $((15 << 20)) ]; then
    tail -c $((15 << 20)) "$1" >"$1.tmp" && mv "$1.tmp" "$1"
    sed -i "1i [device_check: log cut to its last 15 MiB of $size bytes]" "$1"
  fi
}

defer() { DEFERRED+=("$1"); note "$1: not started, $(left)s left in this call's budget; run it in the next call"; }

gpu_slug() {
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 |
    tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g'
}

require_build() {
  "$PY" - <<'EOF' || die "kvcomp has no CUDA build here: run the build stage first (a fresh machine is bare; builds persist only while the machine stays warm)"
import torch, kvcomp
ops = ["quantize_write", "seal_blocks", "paged_decode_attention", "merge_attention_states",
       "accumulate_scores", "heavy_hitter_topk", "compact", "gather_dequant"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key("kvcomp::" + o, "CUDA")]
assert torch.cuda.is_available(), "torch sees no GPU"
assert not missing, f"no CUDA kernel for {missing}"
EOF
}

sanitizer() {
  command -v compute-sanitizer 2>/dev/null && return
  local c
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
  return 1
}

stage_info() {
  nvidia-smi || die "nvidia-smi failed: no GPU on this machine?"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
  nvcc --version 2>/dev/null | tail -n 2 || note "nvcc not on PATH"
  "$(sanitizer)" --version 2>/dev/null | head -n 1 || note "compute-sanitizer not found"
  note "commit: ${KVCOMP_COMMIT:-unknown (set KVCOMP_COMMIT)}"
}

stage_build() {
  local secs
  secs=$(limit "${BUILD_TIMEOUT:-480}" 120)
  [ "$secs" = 0 ] && { defer build; return; }
  rm -rf build/lib.* build/bdist.* "$KEEP/dist" python/kvcomp/_C.cpython-*.so
  run_logged build "$secs" "$OUT/build.log" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip wheel --no-build-isolation --no-deps -w "$KEEP/dist" .
  [ "$LAST_RC" = 0 ] || die "build failed (exit code $LAST_RC): see build.log"
  local wheel
  wheel=$(ls "$KEEP"/dist/kvcomp-*-cp310-abi3-*.whl) || die "no cp310-abi3 wheel in $KEEP/dist"
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kvcomp/_C.abi3.so", "python")' "$wheel"
  note "build: $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
  require_build
  note "build: every op has a CUDA kernel"
}

stage_test() {
  local secs workers=()
  require_build
  secs=$(limit "${TEST_TIMEOUT:-480}" 120)
  [ "$secs" = 0 ] && { defer test; return; }
  if "$PY" -c 'import xdist' 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-8}"); fi
  run_logged test "$secs" "$OUT/pytest-cuda.log" "$PY" -m pytest -m cuda -q -p no:cacheprovider \
    ${workers[@]+"${workers[@]}"} -rfE --durations=15 tests
}

stage_sanitize() {
  local tool secs cs
  require_build
  cs=$(sanitizer) || { note "sanitize: compute-sanitizer not found"; record sanitize 127 0; return; }
  for tool in memcheck racecheck; do
    secs=$(limit "${SANITIZE_TIMEOUT:-240}" 90)
    [ "$secs" = 0 ] && { defer "sanitize-$tool"; continue; }
    # No caching allocator: every tensor is its own cudaMalloc, so memcheck
    # sees an access past a tensor's end (inside torch's pooled segments it
    # would not). API errors torch provokes on purpose are not kvcomp's.
    run_logged "sanitize-$tool" "$secs" "$OUT/sanitize-$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$cs" --tool "$tool" --error-exitcode 86 --report-api-errors no --print-limit 50 \
      "$PY" -m pytest -m cuda -q -p no:cacheprovider -k smoke tests/test_cuda.py
  done
}

stage_bench() {
  local secs json
  require_build
  secs=$(limit "${BENCH_TIMEOUT:-480}" 180)
  [ "$secs" = 0 ] && { defer bench; return; }
  json="$OUT/$(date -u +%F)-$(gpu_slug).json"
  run_logged bench "$secs" "$OUT/bench.log" "$PY" -m kvcomp.bench.cli ops --device cuda --sweep \
    --plain --json "$json"
  if [ -f "$json" ]; then cp "$json" "$KEEP/"; note "bench: wrote $(basename "$json")"; fi
}

stage_summary() {
  {
    echo "== device_check summary ($(date -u +%FT%TZ), commit ${KVCOMP_COMMIT:-unknown})"
    echo "-- stage runs on this machine (newest last):"
    cat "$KEEP/status.txt" 2>/dev/null || echo "(none)"
    if [ -f "$KEEP/pytest-cuda.log" ]; then
      echo "-- pytest -m cuda: $(grep -E '(passed|failed|error)' "$KEEP/pytest-cuda.log" | tail -n 1)"
      grep -E '^(FAILED|ERROR) ' "$KEEP/pytest-cuda.log" | head -n 30 || true
    fi
    for tool in memcheck racecheck; do
      if [ -f "$KEEP/sanitize-$tool.log" ]; then
        echo "-- $tool: $(grep -E 'ERROR SUMMARY' "$KEEP/sanitize-$tool.log" | tail -n 1)" \
          "| $(grep -E '(passed|failed)' "$KEEP/sanitize-$tool.log" | tail -n 1)"
      fi
    done
    local json
    json=$(ls -t "$KEEP"/*.json 2>/dev/null | head -n 1 || true)
    if [ -n "$json" ]; then
      echo "-- bench: $(basename "$json")"
      "$PY" -m kvcomp.bench.report --plain "$json" || true
    fi
    if [ ${#DEFERRED[@]} -gt 0 ]; then echo "-- not run in this call (run next): ${DEFERRED[*]}"; fi
    if [ ${#FAILED[@]} -gt 0 ]; then echo "-- FAILED in this call: ${FAILED[*]}"; fi
  } | tee "$OUT/summary.txt"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
for s in "${stages[@]}"; do
  case $s in
    info | build | test | sanitize | bench | summary | all) ;;
    *) die "unknown stage '$s' (info, build, test, sanitize, bench, summary, all)" ;;
  esac
done
for s in "${stages[@]}"; do
  if [ "$s" = all ]; then
    for t in info build test sanitize bench; do "stage_$t"; done
  elif [ "$s" != summary ]; then
    "stage_$s"
  fi
done
stage_summary
[ ${#FAILED[@]} -eq 0 ] || die "failed stages: ${FAILED[*]} (logs in $OUT)"
