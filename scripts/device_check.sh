#!/usr/bin/env bash
# One prepared check of the GPU path (issue 10), within 8 minutes on one GPU, offline (installs and
# downloads nothing). Logs and a JSON summary (summary.json) go to $OUT, or results/device/ when unset.
#
#   scripts/device_check.sh                 # on a machine with CUDA
#   scripts/device_check.sh --device cpu    # smoke test (< ~60 s): the CUDA parts skipped, tiny sizes
#
# Parts: 1. the tests marked `gpu` (tests/test_gpu.py: CUDA vs CPU forward/backward in fp32 and bf16,
# the SDPA kernel, syncs per window, resume after a kill, a 1-rank NCCL DDP step, predict labels);
# 2. benchmarks/pretrain_throughput.py --device cuda at the benchmark's sizes, batch 32 and the largest
# of 256/128 that fits, ours vs HF AlbertForPreTraining in bf16 and fp32/TF32; 3. the tiny pipeline's
# training stages with training.device=cuda on a generated corpus (scripts/device_pipeline.py; the
# data stage's download is what a machine without network cannot run).
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
cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" CI=1
PY="${PYTHON:-python}"
START=$(date +%s)
STATUS="$OUT/status.tsv"  # part <tab> exit status <tab> seconds <tab> log
: > "$STATUS"

part() {  # part NAME TIMEOUT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record its status
  local name="$1" limit="$2"; shift 2
  local begin=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/device_check.log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name	$rc	$(( $(date +%s) - begin ))	$name.log" >> "$STATUS"
  echo "   exit $rc after $(( $(date +%s) - begin )) s" | tee -a "$OUT/device_check.log"
  return $rc
}

{
  echo "host $(hostname), $(date -u +%FT%TZ), load: $(uptime)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} > "$OUT/environment.log" 2>&1
cat "$OUT/environment.log"

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "--device cuda: this torch sees no CUDA device (see $OUT/environment.log); --device cpu runs the smoke test" >&2
  exit 2
fi

# 1. the gpu-marked tests (skipped without CUDA: the smoke run checks that they collect and skip)
part tests 300 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rA -s --junitxml="$OUT/tests.xml" tests/test_gpu.py

# 2. throughput
if [ "$DEVICE" = cuda ]; then
  part bench_b32 120 "$PY" benchmarks/pretrain_throughput.py --device cuda --tf32 --batch 32 --steps 10 --rounds 5 \
    --warmup 3 --no-pkm
  part bench_b256 120 "$PY" benchmarks/pretrain_throughput.py --device cuda --tf32 --batch 256 --steps 5 --rounds 3 \
    --warmup 2 --no-pkm
  if [ "$(tail -1 "$STATUS" | cut -f2)" = 3 ]; then  # out of memory: the next size down
    part bench_b128 120 "$PY" benchmarks/pretrain_throughput.py --device cuda --tf32 --batch 128 --steps 5 --rounds 3 \
      --warmup 2 --no-pkm
  fi
else
  part bench_smoke 180 "$PY" benchmarks/pretrain_throughput.py --device cpu --quick --steps 1 --rounds 1 --no-pkm \
    --bf16 off
fi

# 3. the pipeline's training stages on the device
if [ "$PIPELINE" = on ]; then
  rm -rf "$OUT/pipeline"
  part pipeline 240 "$PY" scripts/device_pipeline.py --device "$DEVICE" \
    --precision "$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)" --work "$OUT/pipeline"
else
  echo "pipeline	skipped	0	-" >> "$STATUS"
  echo "== pipeline: skipped (--device cpu; --pipeline runs it on the CPU)" | tee -a "$OUT/device_check.log"
fi

"$PY" - "$OUT" "$DEVICE" "$START" <<'EOF'
import json, os, re, sys, time, xml.etree.ElementTree as ET
out, device, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
parts = {}
for line in open(os.path.join(out, "status.tsv"), encoding="utf-8"):
    name, rc, seconds, log = line.rstrip("\n").split("\t")
    parts[name] = {"exit": None if rc == "skipped" else int(rc), "seconds": int(seconds), "log": log,
                   "skipped": rc == "skipped"}
    path = os.path.join(out, log)
    if log != "-" and os.path.exists(path):
        lines = [l for l in open(path, encoding="utf-8", errors="replace") if l.startswith("{")]
        if lines:
            try:
                parts[name]["result"] = json.loads(lines[-1])
            except json.JSONDecodeError:
                pass
        if name == "tests":
            kernels = [l.strip() for l in open(path, encoding="utf-8", errors="replace")
                       if l.startswith(("attention kernels", "resume on CUDA", "predict:")) or "synchronizing" in l]
            parts[name]["notes"] = kernels
xml = os.path.join(out, "tests.xml")
if os.path.exists(xml):
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    parts["tests"]["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
# a benchmark that ran out of memory (exit 3) and was replaced by the next size is not a failure
oom_ok = parts.get("bench_b256", {}).get("exit") == 3 and parts.get("bench_b128", {}).get("exit") == 0
failed = [n for n, p in parts.items() if p["exit"] not in (0, None) and not (n == "bench_b256" and oom_ok)]
summary = {"device": device, "ok": not failed, "failed": failed, "elapsed_s": int(time.time()) - start,
           "load_average": os.getloadavg()[0], "parts": parts,
           "note": "pipeline = vocab/pairs/pretrain/finetune stages on a generated corpus (no network for the data "
                   "stage's download)"}
with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
    json.dump(summary, fh, indent=2)
print(json.dumps({k: summary[k] for k in ("device", "ok", "failed", "elapsed_s")}))
sys.exit(0 if summary["ok"] else 1)
EOF
