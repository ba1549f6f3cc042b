#!/usr/bin/env bash
# One pass over every GPU path, for a machine with CUDA GPUs (prints JSON lines and a summary):
# bf16 + fused AdamW training steps, the device colour augmentation, the bootstrap cache on the
# device, torch.compile, SOVE's judge cost, and NCCL with --gpus. Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check}"
mkdir -p "$out"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
echo "{\"gpus\": $gpus, \"name\": \"$(python -c 'import torch; print(torch.cuda.get_device_name(0))')\"}"
run() {  # name, command...: time-limited, output kept
  local name=$1; shift
  echo "== $name"
  timeout 300 "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "{\"check\": \"$name\", \"rc\": $?}"
  tail -c 2000 "$out/$name.json"
}
run photometric python benchmarks/photometric.py --device cuda
run loader python benchmarks/loader.py --device cuda --workers 8 --batches 20 --warmup 5
run throughput-dino2-s16 python benchmarks/throughput.py --preset dino2-vits16 --data builtin:shapes \
    --set optim.batch_size=256 --set train.workers=8 --steps 30 --warmup 10
run throughput-dino2-s16-compile python benchmarks/throughput.py --preset dino2-vits16 --data builtin:shapes \
    --set optim.batch_size=256 --set train.workers=8 --set train.compile=true --steps 30 --warmup 15
run throughput-dino-s16-multicrop python benchmarks/throughput.py --preset dino-vits16 --data builtin:shapes \
    --set optim.batch_size=128 --set train.workers=8 --steps 20 --warmup 5
run throughput-simdino-s16-multicrop python benchmarks/throughput.py --preset simdino-vits16 --data builtin:shapes \
    --set optim.batch_size=128 --set train.workers=8 --steps 20 --warmup 5
# SOVE's judge search and soft-label products: their share of a ViT-S/16 step (memory 65,536, 8192 anchors)
run throughput-sove-s16-multicrop python benchmarks/throughput.py --preset sove-vits16 --data builtin:shapes \
    --set optim.batch_size=128 --set train.workers=8 --steps 20 --warmup 5 --profile
run pretrain-sove ssl pretrain --preset demo-sove --device cuda --set train.epochs=2 --out "$out/run-sove" --json
run pretrain-simdino ssl pretrain --preset demo-simdino --device cuda --set train.epochs=2 --out "$out/run-simdino" --json
run bootstrap python benchmarks/bootstrap.py --n 1281167 --dim 384 --window 10 --top-k 3 --batch 256
run pretrain-adasim ssl pretrain --preset demo-adasim --device cuda --set train.epochs=3 --out "$out/run-adasim" --json
# the audit's neighbour graph on the device (ImageNet projection from 100k and 200k images) and the
# logistic-regression probe (L-BFGS) on the device, from the AdaSim run above
run audit python benchmarks/audit.py --weights "$out/run-adasim" --out "$out/audit" --graph-sizes 100000,200000
run logreg ssl eval linear --weights "$out/run-adasim" --train builtin:shapes:train --val builtin:shapes:val \
    --device cuda --json
if [ "$gpus" -ge 2 ]; then
  run pretrain-nccl ssl pretrain --preset demo --gpus 2 --set train.epochs=2 --out "$out/run-nccl" --json
fi
