#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (see README "GPU results"). Writes logs to $OUT (or ./gpu_out).
# Each step has its own time limit and runs even when an earlier one failed.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/env.log"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__,
 'accelerate', accelerate.__version__, 'torch flash', torch.backends.cuda.is_flash_attention_available())" | tee -a "$OUT/env.log"
timeout 200 python3 -m pytest -p no:cacheprovider -q -m gpu -rs tests/test_gpu.py tests/test_kernels.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -25
timeout 120 python3 benchmarks/calibrate_attention.py --base h200 --out "$OUT/h200_torch_flash.json" 2>&1 \
    | tee "$OUT/calibrate.log"
CLUSTER="$OUT/h200_torch_flash.json"; [ -f "$CLUSTER" ] || CLUSTER=h200
timeout 200 python3 benchmarks/gpu_replay.py --worlds 8,32 --cluster "$CLUSTER" --json "$OUT/replay.json" 2>&1 \
    | tee "$OUT/replay.log"
