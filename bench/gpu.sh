#!/usr/bin/env bash
# bench.bench on the device machine (real CUDA vLLM 0.26.0 from ../shared/gpu). From the project root,
# after `source .gpu/s/install.sh` (vLLM in /tmp/site, the 0.5B-shaped random model in /tmp/m):
#   bash bench/gpu.sh [--label NAME] BENCH_ARGS...
#   e.g. bash bench/gpu.sh --label h100 --preset h100 --ceiling --separate --n 7370 --rounds 5 \
#          --data .gpu/s/pmpp_qa.jsonl --set DISABLE_TOKEN_ROUTING=1 --set GPU_MEMORY_UTILIZATION=0.2
# Writes $OUT/NAME.json (the report), NAME.log (the service's log), NAME.err (the bench's log).
# --ceiling without --separate keeps the service's and the ceiling's engines on the GPU together: choose
# GPU_MEMORY_UTILIZATION (and VLLM_KV_CACHE_MEMORY_BYTES) so that both fit, e.g. 0.4 for one engine each.
set -euo pipefail
label=bench
if [ "${1:-}" = --label ]; then label=$2; shift 2; fi
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  MODEL_ID=local MODEL_DIR=/tmp/m DTYPE=bfloat16 WARMUP_DATA_PATH= HOST=127.0.0.1 LOG_LEVEL=info
rc=0
python3 -m bench.bench --log "$out/$label.log" --output "$out/$label.json" "$@" --json \
  >"$out/$label.err" 2>&1 || rc=$?
grep '^\[bench\]' "$out/$label.err" || true
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
if [ "$rc" != 0 ]; then echo "[gpu.sh] bench exited $rc; the service log ends:"; tail -n 40 "$out/$label.log" || true; fi
cat "$out/$label.json"
exit "$rc"
