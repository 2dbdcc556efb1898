#!/usr/bin/env bash
# Issue 7's GPU checks in one prepared run, for a session lent a GPU (the device machine's
# python3 holds torch, triton and timm). Each step has its own time limit and writes its log
# under $OUT, so a step that runs long costs only itself (limits sum to 8.5 min, inside one
# device call of 10 with the machine's start):
#   1. the gpu-marked tests (the kernels' full shape x dtype matrix, torch.compile, memory);
#   2. the op alone against timm's paths, FlexAttention and winattn's SDPA (bench_gpu_op.py);
#   3. Swin-T with torch.compile'd entries, then Swin-B eager (bench_gpu_swin.py).
# Usage (repo root): OUT=gpu-results bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; git rev-parse HEAD; } \
    > "$OUT/machine.txt" 2>&1
timeout 150 "$PY" -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu-tests.txt"
timeout 90 "$PY" benchmarks/bench_gpu_op.py --json "$OUT/gpu-op.json" 2>&1 | tee "$OUT/gpu-op.md"
timeout 180 "$PY" benchmarks/bench_gpu_swin.py --models swin_tiny_patch4_window7_224 --compile \
    --json "$OUT/gpu-swin-t.json" 2>&1 | tee "$OUT/gpu-swin-t.md"
timeout 90 "$PY" benchmarks/bench_gpu_swin.py --models swin_base_patch4_window7_224 \
    --json "$OUT/gpu-swin-b.json" 2>&1 | tee "$OUT/gpu-swin-b.md"
