#!/usr/bin/env bash
# The prepared GPU run of issue 14 (one H100/H200, <= 8 minutes): writes results/speed.md sections that name
# the GPU. Each part has its own time limit and the run goes on when one part fails.
#   1. gpu_decode.py: base (700M) generation at the K600 protocol, batch 1 and 16, NBP vs NTP, eager vs
#      CUDA-graph decode step, frames/s with tokenizer encode + decode, fraction of the memory-bound limit,
#      greedy equality of the graph path with the eager path, peak memory;
#   2. generator_speed.py: base training step at 1280 tokens, bf16, FlexAttention vs SDPA, MFU;
#   3. sampling_speed.py on the GPU (base sizes): cached step vs bare forward vs full forward;
#   4. the CUDA tests of the generator (compiled FlexAttention with gradients).
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
part gpu_decode 240 $PY benchmarks/gpu_decode.py --device cuda --batch 1 16 --skip-ntp-eager-batch --md "$MD"
part generator_speed 120 $PY benchmarks/generator_speed.py --device cuda --preset base --batch 24 16 --modes flex sdpa \
  --warmup 3 --steps 6 --md "$MD"
part sampling_speed 60 $PY benchmarks/sampling_speed.py --device cuda --n-layer 24 --n-embd 1536 --n-head 16 \
  --repeats 2 --no-reference --md "$MD"
part cuda_tests 60 $PY -m pytest -q -m gpu tests/test_generator_model.py
echo "=== done in $(( $(date +%s) - start ))s, status $status"
exit $status
