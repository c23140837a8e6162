#!/usr/bin/env bash
# One lent-GPU session in one command (docs/performance.md, "GPU figures"):
#   1. GPU figures: the full-size SAM 3 architecture with random weights at 1008 px, bf16-mixed: step time and peak
#      memory per LoRA preset and batch size, the memory switches on one preset, and prediction.
#   2. The tiny-pretrained base: three pretraining runs (lr 5e-4 / 1e-3 / 2e-3) side by side on the GPU, each sized
#      to the time left; each keeps its best weights in $OUT as it goes (scripts/pretrain_tiny.py --best-weights).
# Wheels of the Python packages the machine lacks travel in .whl/ (see docs/performance.md). Everything lands in
# $OUT: log.txt, gpu_train.json, gpu_perf.json, gpu_predict.json, pre_{A,B,C}.safetensors (at most 8 files).
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

# The pretraining set, made on the CPU while the GPU benchmarks run.
DATA=/tmp/pretrain-data
python3 -c "
from scripts.pretrain_tiny import PRETRAIN_CATEGORIES
from sam3lora.data.synthetic import write_synthetic
from sam3lora.model import load_model
load_model('tiny')  # materialised once, before the parallel runs
write_synthetic('$DATA', train=${PRE_TRAIN:-2048}, val=64, categories=PRETRAIN_CATEGORIES, seed=101, hard_negatives=0.0)
print('pretraining set ready')" &
DATA_PID=$!

BENCH=(python3 scripts/benchmark.py train --model sam3-random --image-size 1008 --device cuda --precision bf16-mixed
       --prompts 4 --steps 5 --warmup 2)
echo "== GPU figures ($(left) s left)"
timeout 160 "${BENCH[@]}" --presets minimal,balanced,full --batch-sizes 1,4,8 --time-budget 110 \
  --json "$OUT/gpu_train.json"
timeout 80 "${BENCH[@]}" --presets balanced --batch-sizes 8 --activation-checkpointing off,on \
  --base-dtype float32,bfloat16 --time-budget 50 --json "$OUT/gpu_perf.json"
timeout 45 python3 scripts/benchmark.py predict --model sam3-random --image-size 1008 --device cuda \
  --precision bf16-mixed --presets balanced --batch-sizes 1,8 --prompts 4 --steps 5 --warmup 2 --time-budget 25 \
  --json "$OUT/gpu_predict.json"

wait $DATA_PID
BUDGET=$(( $(left) - 45 ))
RUNS=()
echo "== pretraining tiny, ${BUDGET} s per run, three runs side by side"
for run in A:5e-4:16 B:1e-3:16 C:2e-3:32; do
  IFS=: read -r name lr batch <<<"$run"
  python3 scripts/pretrain_tiny.py --budget "$BUDGET" --data "$DATA" --train "${PRE_TRAIN:-2048}" --lr "$lr" \
    --batch-size "$batch" --workers 4 --accelerator gpu --name "$name" --best-weights "$OUT/pre_$name.safetensors" \
    --no-out loss.weight_dice=40 2>&1 | grep --line-buffered -E "^\[|Error|error|Traceback" &
  RUNS+=($!)
done
wait "${RUNS[@]}"  # a bare `wait` would also wait for the tee above, which never ends: the script would hang
echo "== done in $(( $(date +%s) - T0 )) s"
ls -la "$OUT"
