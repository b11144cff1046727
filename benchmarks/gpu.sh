#!/usr/bin/env bash
# The prepared GPU run of issue 14 (one H100/H200, <= 8 minutes): writes results/speed.md sections that name
# the GPU. Each part has its own time limit and the run goes on when one part fails.
#   1. gpu_decode.py: base (700M) generation at the K600 protocol, batch 1 and 16, NBP vs NTP, eager vs
#      CUDA-graph decode step, frames/s with tokenizer encode + decode, fraction of the memory-bound limit,
#      greedy equality of the graph path with the eager path, peak memory;
#   2. generator_speed.py: base training step at 1280 tokens, bf16, FlexAttention vs SDPA, MFU;
#   3. sampling_speed.py on the GPU (base sizes): cached step vs bare forward vs full forward;
#   4. the CUDA tests of the generator (compiled FlexAttention with gradients);
#   5. resource_plan.py: every paper stage at its real sizes (tokenizer training with LPIPS + PatchGAN + EMA,
#      encode/decode, base/xl/3b generator training, sampling, I3D), then GPU-hours, disk and Slurm resources per
#      suite; base's training step is generator_speed.py's flex row (--json, not measured twice), 3b then xl are
#      measured and skipped (marked in the section) once --budget seconds have passed.
# Limits: 150 + 80 + 35 + 40 + 170 = 475 s of the 480 s budget (repeats and steps cut to fit).
# Usage: bash benchmarks/gpu.sh [results/speed.md]   (on the machine with the GPU, from any folder)
set -uo pipefail
cd "$(dirname "$0")/.."
MD=${1:-results/speed.md}
PY=${PYTHON:-python}
start=$(date +%s)
status=0
part() {  # part NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - start ))s)"
  if ! timeout "$limit" "$@"; then echo "=== $name FAILED or timed out"; status=1; fi
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
GEN_JSON=$(mktemp --suffix .json)
part gpu_decode 150 $PY benchmarks/gpu_decode.py --device cuda --batch 1 16 --skip-ntp-eager-batch --repeats 2 --md "$MD"
part generator_speed 80 $PY benchmarks/generator_speed.py --device cuda --preset base --batch 16 --modes flex sdpa \
  --warmup 2 --steps 4 --md "$MD" --json "$GEN_JSON"
part sampling_speed 35 $PY benchmarks/sampling_speed.py --device cuda --n-layer 24 --n-embd 1536 --n-head 16 \
  --repeats 1 --no-reference --md "$MD"
part cuda_tests 40 $PY -m pytest -q -m gpu tests/test_generator_model.py
part resource_plan 170 $PY benchmarks/resource_plan.py --device cuda --warmup 1 --steps 3 --budget 120 \
  --reuse-json "$GEN_JSON" --md "$MD"
rm -f "$GEN_JSON"
echo "=== done in $(( $(date +%s) - start ))s, status $status"
exit $status
