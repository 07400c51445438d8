#!/usr/bin/env bash
# bench.bench on the device machine (real CUDA vLLM 0.26.0 from ../shared/gpu). From the project root,
# after `source .gpu/s/install.sh` (vLLM in /tmp/site, the 0.5B-shaped random model in /tmp/m):
#   bash bench/gpu.sh [--label NAME] [--model DIR] [--mps] BENCH_ARGS...
#   e.g. bash bench/gpu.sh --label auto --ceiling --n 7370 --rounds 5 --data .gpu/s/pmpp_qa.jsonl
# --model: another model directory (e.g. /tmp/m4 from `python3 -m bench.random_model ... --shape qwen3-4b`).
# --mps: run the service and the ceiling under CUDA MPS (a control daemon with its own pipe directory,
#        started here and stopped at the end; the device allows it, see ../shared/ENGINE_NOTES.md).
# Writes $OUT/NAME.json (the report), NAME.log (the service's log), NAME.err (the bench's log).
# --ceiling without --separate keeps the service's and the ceiling's engines on the GPU together: choose
# GPU_MEMORY_UTILIZATION (and VLLM_KV_CACHE_MEMORY_BYTES) so that both fit, e.g. 0.4 for one engine each.
set -euo pipefail
label=bench model=/tmp/m mps=0
while :; do
  case "${1:-}" in
    --label) label=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --mps) mps=1; shift ;;
    *) break ;;
  esac
done
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 \
  VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  MODEL_ID=local MODEL_DIR=$model DTYPE=bfloat16 WARMUP_DATA_PATH= HOST=127.0.0.1 LOG_LEVEL=info
mpsctl=/usr/local/nvidia/bin/nvidia-cuda-mps-control
if [ "$mps" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe-$label CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log-$label
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  "$mpsctl" -d
  trap 'echo quit | "$mpsctl" || true' EXIT
  echo "[gpu.sh] CUDA MPS on ($CUDA_MPS_PIPE_DIRECTORY)"
fi
rc=0
python3 -m bench.bench --log "$out/$label.log" --output "$out/$label.json" "$@" --json \
  >"$out/$label.err" 2>&1 || rc=$?
grep '^\[bench\]' "$out/$label.err" || true
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
if [ "$rc" != 0 ]; then echo "[gpu.sh] bench exited $rc; the service log ends:"; tail -n 40 "$out/$label.log" || true; fi
exit "$rc"
