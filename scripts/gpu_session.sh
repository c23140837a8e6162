#!/usr/bin/env bash
# One lent-GPU session in one command (docs/training.md, "Pretraining across sessions"; docs/performance.md):
#   1. The tiny base's pretraining (issue #12), first: image passes/s of scripts/pretrain_tiny.py on the GPU
#      (bf16, batch sizes 64 / 256 / 1024, JSON), then one resumable run trained for the time left at the fastest
#      batch size. A run carried in (state directory $STATE_IN, e.g. logs/pretrain/gpu from the previous session's
#      $OUT/gpu) is resumed instead of starting a new one; a new run starts from $INIT when given (the CPU run's
#      best.safetensors). The state goes back in $OUT/gpu (state.pt, best.safetensors, history.json).
#   2. With FIGURES=1 only (measured already, docs/gpu/*.json): the full-size SAM 3 architecture with random weights
#      at 1008 px, bf16-mixed: step time and peak memory per LoRA preset and batch size, the memory switches on one
#      preset (and all of them at once: issue #14's 24 GB target), torch.compile off/on, and prediction.
# Knobs (environment): PRE_TRAIN (8192 images), PRE_BATCHES ("64 256 1024"), PRE_LR (2e-3), PRE_STEPS (20000; on resume
# only when given: a longer run), PRE_WARM (1500), PRE_BF16 (1), PRE_DEVICE (cuda; cpu runs the same flow here).
# Wheels of the Python packages the machine lacks travel in .whl/ (see docs/performance.md). Everything lands in
# $OUT: log.txt, pretrain_bench.json, gpu/{state.pt,best.safetensors,history.json} (+ gpu_*.json with FIGURES=1).
set -uo pipefail
OUT=${OUT:-/tmp/sam3lora-gpu}
TOTAL=${TOTAL:-540}            # seconds this script may take in all
mkdir -p "$OUT"
T0=$(date +%s)
exec > >(tee -a "$OUT/log.txt") 2>&1
left() { echo $((TOTAL - ($(date +%s) - T0))); }

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 SAM3LORA_HOME=/tmp/sam3lora-home PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import sys, torch, transformers, peft, lightning, hydra, albumentations
print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft',
      peft.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())" || exit 1

PRE=(python3 scripts/pretrain_tiny.py --device "${PRE_DEVICE:-cuda}" --train "${PRE_TRAIN:-8192}"
     --val "${PRE_VAL:-64}" --cache /tmp/pretrain-cache)
[ "${PRE_BF16:-1}" = 1 ] && PRE+=(--bf16)
echo "== pretraining: image passes/s ($(left) s left)"
load_model() { python3 -c "from sam3lora.model import load_model; load_model('tiny', dtype='float32', seed=0)"; }
load_model || exit 1
for batch in ${PRE_BATCHES:-64 256 1024}; do  # the first call renders the cached set (all cores), the others reuse it
  [ "$(left)" -lt 300 ] && break  # keep most of the session for training
  timeout 90 "${PRE[@]}" --benchmark 5 --batch-size "$batch" | tee -a "$OUT/pretrain_bench.json"
done
BEST_BATCH=$(python3 -c "
import json
rows = [json.loads(l) for l in open('$OUT/pretrain_bench.json') if l.startswith('{')]
print(max(rows, key=lambda r: r['images_per_s'])['batch_size'] if rows else 256)")

if [ "${FIGURES:-0}" = 1 ]; then
  BENCH=(python3 scripts/benchmark.py train --model sam3-random --image-size 1008 --device cuda --precision bf16-mixed
         --prompts 4 --steps 5 --warmup 2)
  echo "== GPU figures ($(left) s left)"
  timeout 160 "${BENCH[@]}" --presets minimal,balanced,full --batch-sizes 1,4,8 --time-budget 110 \
    --json "$OUT/gpu_train.json"
  timeout 80 "${BENCH[@]}" --presets balanced --batch-sizes 8 --activation-checkpointing off,on \
    --base-dtype float32,bfloat16 --time-budget 50 --json "$OUT/gpu_perf.json"
  # issue #14's targets: balanced at batch 8 with every memory switch (peak <= 24 GB) and torch.compile (MFU)
  timeout 150 "${BENCH[@]}" --presets balanced --batch-sizes 8 --activation-checkpointing all \
    --base-dtype bfloat16 --time-budget 40 --json "$OUT/gpu_memory_switches.json"
  timeout 240 "${BENCH[@]}" --presets balanced --batch-sizes 8 --compile off,on --time-budget 200 \
    --json "$OUT/gpu_compile.json"
  timeout 45 python3 scripts/benchmark.py predict --model sam3-random --image-size 1008 --device cuda \
    --precision bf16-mixed --presets balanced --batch-sizes 1,8 --prompts 4 --steps 5 --warmup 2 --time-budget 25 \
    --json "$OUT/gpu_predict.json"
fi

BUDGET=$(( $(left) - 40 ))
mkdir -p "$OUT/gpu"
if [ "$BUDGET" -lt 30 ]; then
  echo "== pretraining: no time left for a run (${BUDGET} s)"
elif [ -n "${STATE_IN:-}" ] && [ -f "$STATE_IN/state.pt" ]; then
  cp "$STATE_IN"/* "$OUT/gpu/"
  echo "== pretraining: resuming $STATE_IN for ${BUDGET} s"
  timeout $((BUDGET + 30)) "${PRE[@]}" --state "$OUT/gpu" --resume --budget "$BUDGET" --val-every 200 \
    ${PRE_STEPS:+--steps "$PRE_STEPS"}
else
  echo "== pretraining: new run, batch ${BEST_BATCH}, for ${BUDGET} s"
  timeout $((BUDGET + 30)) "${PRE[@]}" --state "$OUT/gpu" --budget "$BUDGET" --batch-size "$BEST_BATCH" \
    --lr "${PRE_LR:-2e-3}" --steps "${PRE_STEPS:-20000}" --warm-steps "${PRE_WARM:-1500}" --val-every 200 \
    ${INIT:+--init "$INIT"}
fi
echo "== done in $(( $(date +%s) - T0 )) s"
ls -la "$OUT" "$OUT/gpu"
