#!/usr/bin/env bash
# One prepared check of the GPU path (issue 10), made for a lent machine's one try (issue 20): at most
# 8 minutes, offline (installs and downloads nothing), torch and the standard scientific packages only
# (no Hydra, OmegaConf, MLflow or DVC needed). What comes back is at most 7 files, flat in $OUT
# (results/device/ when unset): summary.json, device_check.log (environment and progress), and one log
# per part. summary.json is rewritten before and after each part, so a run stopped at any moment still
# says what passed and what was running.
#
#   scripts/device_check.sh                            # on a machine with CUDA
#   scripts/device_check.sh --device cpu               # smoke test (< ~1 min): CPU-only parts, tiny sizes
#   scripts/device_check.sh --device cpu --pipeline    # the same and the device pipeline in bf16 (~2 min)
#
# Python: $PYTHON, else $VENV/bin/python ($VENV: the project's .venv), else python3, else python; the
# first that imports torch. Test hook: DEVICE_CHECK_LIMITS="tests=2 pipeline=5" shortens parts' limits.
#
# Parts: 1. the tests marked `gpu` (tests/test_gpu.py) on every device present: CUDA vs the CPU's fp32
# forward/backward in fp32 and bf16, bf16 pretraining with PLL, bf16 finetuning, predict labels, the
# SDPA kernel, syncs per window, resume after a kill, 1 vs 2 workers on the GPU; 2. the throughput of
# benchmarks/pretrain_throughput.py at the benchmark's sizes, batch 32 and the largest of 256/128 that
# fits, ours vs HF AlbertForPreTraining in bf16 and fp32/TF32; 3. the tiny pipeline's training stages
# in bf16 on the device on a generated corpus (scripts/device_pipeline.py; the data stage's download is
# what a machine without network cannot run).
set -u -o pipefail
DEVICE=cuda
PIPELINE=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --pipeline) PIPELINE=on; shift ;;
    --no-pipeline) PIPELINE=off; shift ;;
    *) echo "usage: $0 [--device cuda|cpu] [--pipeline|--no-pipeline]" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "--device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
[ "$PIPELINE" = auto ] && { [ "$DEVICE" = cuda ] && PIPELINE=on || PIPELINE=off; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/results/device}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# this run's files only come back (the names it writes; nothing else in $OUT is touched)
rm -f "$OUT"/{device_check,tests,bench_smoke,bench_b32,bench_b256,bench_b128,pipeline}.log "$OUT"/summary.json{,.tmp}
# status.tsv, the junit XML and the pipeline's work folder stay out of $OUT (few files may come back)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" CI=1
START=$(date +%s)
TOTAL_S=480  # the whole script, worst case; each part's limit is also cut to what is left of it
LOG="$OUT/device_check.log"
: > "$WORK/status.tsv"

say() { echo "$*" | tee -a "$LOG"; }

fail_early() {  # fail_early MESSAGE: one line on stderr, a summary that says why, exit 2
  echo "error: $1" | tee -a "$LOG" >&2
  printf '{"device": "%s", "ok": false, "complete": true, "error": "%s", "parts": {}}\n' "$DEVICE" \
    "${1//\"/\'}" > "$OUT/summary.json"
  exit 2
}

# The interpreter: the first candidate whose torch runs on $DEVICE (the lent image has python3, maybe no
# python; a CPU-only .venv copied along is passed over for --device cuda). Probes are bounded: a driver
# that hangs CUDA's start must not eat the run's minutes.
VENV="${VENV:-$REPO/.venv}"
if [ -n "${PYTHON:-}" ]; then CANDIDATES=("$PYTHON"); else CANDIDATES=("$VENV/bin/python" python3 python); fi
PY="" NO_CUDA=""
for candidate in "${CANDIDATES[@]}"; do
  command -v "$candidate" > /dev/null 2>&1 || continue
  timeout 60 "$candidate" -c "import sys, torch; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 3)" \
    > /dev/null 2>&1
  case $? in
    0) PY="$(command -v "$candidate")"; break ;;
    3) NO_CUDA="${NO_CUDA:-$(command -v "$candidate")}" ;;
  esac
done

{
  echo "host $(hostname), $(date -u +%FT%TZ), load: $(uptime)"
  echo "python ${PY:-$NO_CUDA}"
  [ -n "${PY:-$NO_CUDA}" ] && timeout 60 "${PY:-$NO_CUDA}" -c "import sys, torch; print('python', \
sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  command -v nvidia-smi > /dev/null && timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >> "$LOG" 2>&1
cat "$LOG"
[ -n "$PY" ] || [ -n "$NO_CUDA" ] || \
  fail_early "no Python that imports torch among: ${CANDIDATES[*]} (set PYTHON=/path/to/python)"
[ -n "$PY" ] || fail_early "--device cuda: no torch among ${CANDIDATES[*]} sees a CUDA device (torch found: \
$NO_CUDA; see $LOG); --device cpu runs the smoke test"

summary() { "$PY" scripts/device_summary.py "$OUT" "$WORK" "$DEVICE" "$START" "$@"; }

limit_of() {  # limit_of NAME NOMINAL_S: DEVICE_CHECK_LIMITS's value for NAME, else NOMINAL_S
  local pair
  for pair in ${DEVICE_CHECK_LIMITS:-}; do
    [ "${pair%%=*}" = "$1" ] && { echo "${pair#*=}"; return; }
  done
  echo "$2"
}

part() {  # part NAME LIMIT_S COMMAND...: run within its limit (and what is left), log to $OUT/NAME.log
  local name="$1" limit begin left rc
  limit="$(limit_of "$1" "$2")"; shift 2
  left=$(( TOTAL_S - ($(date +%s) - START) - 10 ))  # 10 s: the kill grace and the last summary
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$left" -lt 5 ]; then
    printf '%s\tno time left\t0\t0\t-\n' "$name" >> "$WORK/status.tsv"
    say "== $name: skipped, no time left of the ${TOTAL_S} s"
    return 1
  fi
  say "== $name (limit ${limit} s): $*"
  summary --running "$name"
  begin=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - begin ))" "$limit" "$name.log" >> "$WORK/status.tsv"
  say "   exit $rc after $(( $(date +%s) - begin )) s$( [ $rc = 124 ] || [ $rc = 137 ] && echo ' (timed out)')"
  summary
  return $rc
}

skip() {  # skip NAME REASON
  printf '%s\t%s\t0\t0\t-\n' "$1" "$2" >> "$WORK/status.tsv"
  say "== $1: skipped ($2)"
}

# 1. the gpu-marked tests on every device present; pytest-timeout bounds each test where it is installed
PER_TEST=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  PER_TEST=(--timeout=120)  # the CUDA resume test runs three stage processes
else
  say "pytest-timeout is not installed: the tests are bounded by the part's limit only"
fi
if [ "$DEVICE" = cuda ]; then TESTS_S=190; else TESTS_S=150; fi
part tests "$TESTS_S" "$PY" -m pytest -m gpu -p no:cacheprovider -q -rA -s ${PER_TEST[@]+"${PER_TEST[@]}"} \
  --junitxml="$WORK/tests.xml" tests/test_gpu.py

# 2. throughput
if [ "$DEVICE" = cuda ]; then
  part bench_b32 75 "$PY" benchmarks/pretrain_throughput.py --device cuda --tf32 --batch 32 --steps 10 --rounds 5 \
    --warmup 3 --no-pkm
  part bench_b256 60 "$PY" benchmarks/pretrain_throughput.py --device cuda --tf32 --batch 256 --steps 5 --rounds 3 \
    --warmup 2 --no-pkm
  if [ "$(tail -1 "$WORK/status.tsv" | cut -f2)" = 3 ]; then  # out of memory: the next size down
    part bench_b128 55 "$PY" benchmarks/pretrain_throughput.py --device cuda --tf32 --batch 128 --steps 5 --rounds 3 \
      --warmup 2 --no-pkm
  fi
else
  part bench_smoke 90 "$PY" benchmarks/pretrain_throughput.py --device cpu --quick --steps 1 --rounds 1 --no-pkm \
    --bf16 off
fi

# 3. the pipeline's training stages on the device, in bf16 (the precision a GPU trains in)
if [ "$PIPELINE" = on ]; then
  # one epoch each on the CPU, where bf16 is emulated (slow) on most machines
  part pipeline 100 "$PY" scripts/device_pipeline.py --device "$DEVICE" --precision bf16 --work "$WORK/pipeline" \
    --epochs "$([ "$DEVICE" = cuda ] && echo 2 || echo 1)"
else
  skip pipeline "--device cpu; --pipeline runs it on the CPU"
fi

summary --final | tee -a "$LOG"
