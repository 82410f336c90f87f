#!/usr/bin/env bash
# The GPU checks, in one call of a lent GPU machine (see README "GPU results"). Writes logs to $OUT (or ./gpu_out).
# Each step has its own time limit and runs even when an earlier one failed.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/env.log"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__,
 'accelerate', accelerate.__version__, 'torch flash', torch.backends.cuda.is_flash_attention_available())" | tee -a "$OUT/env.log"
timeout 90 python3 -m pytest -p no:cacheprovider -q -m gpu -rs tests/test_gpu.py tests/test_kernels.py 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -5
# 1. the kernel's tile model, fitted to a grid of timed shapes
timeout 150 python3 benchmarks/calibrate_attention.py --base h200 --out "$OUT/h200_torch_flash.json" 2>&1 \
    | tee "$OUT/calibrate.log"
CLUSTER="$OUT/h200_torch_flash.json"; [ -f "$CLUSTER" ] || CLUSTER=docs/measurements/h200_torch_flash.json
# 2. every rank's kernels of real plans (block 4096, as the simulator): the default planner (balances kernel
#    work), the planner balancing pairs, and zigzag ring; the freshly fitted model predicts each rank
R="python3 benchmarks/gpu_replay.py --block 4096 --cluster $CLUSTER --skip-world1"
timeout 130 $R --worlds 16 --strategies fcp,fcp-pairs,ring --json "$OUT/replay_lognormal_w16.json" 2>&1 \
    | tee "$OUT/replay_lognormal_w16.log"
STDLIB=file:docs/measurements/stdlib_lengths_py311.txt  # this machine's lengths, not the GPU machine's Python
timeout 60 $R --worlds 16 --strategies fcp,fcp-pairs,ring --distribution $STDLIB --json "$OUT/replay_stdlib_w16.json" \
    2>&1 | tee "$OUT/replay_stdlib_w16.log"
timeout 150 $R --worlds 32 --strategies fcp,fcp-pairs --reps 2 --json "$OUT/replay_lognormal_w32.json" 2>&1 \
    | tee "$OUT/replay_lognormal_w32.log"
