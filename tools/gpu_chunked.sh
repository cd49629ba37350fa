#!/usr/bin/env bash
# On an H200 of the device tool: the two-launch chunked WKV-7 kernel (ops/wkv7.py), compiled.
# 1. its tests and the model's with it (CUDA: compiled, not the interpreter);
# 2. WKV-7 alone for prompts, token-by-token vs chunked, errors against the float32 recurrence,
#    and the chunked kernel's chunk sizes / value rows / warps (bench_wkv_chunked.py --quick);
# 3. one 4,096-token prompt through the whole model at 1.5B and 7.2B (random fp16 weights): the
#    runtime's default (variant 12) against the same with the chunked kernel for prompts (variant 9),
#    share of the fp16 matmul floor (bench_decode.py, prefill only).
# Writes under $OUT: gpu.txt, tests.log, prefill-chunked.{json,md,log}, prefill-model.{json,md,log}.
set -o pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_wkv7.py tests/test_kernel_model.py \
  tests/test_cuda.py -k "chunk" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -3 "$OUT/tests.log"
timeout "${PREFILL_TIMEOUT:-150}" python3 benchmarks/bench_wkv_chunked.py --quick --out "$OUT/prefill-chunked" > "$OUT/prefill-chunked.log" 2>&1
echo "wkv exit $?"; grep "^|" "$OUT/prefill-chunked.log" | head -30
timeout "${MODEL_TIMEOUT:-200}" python3 benchmarks/bench_decode.py --shapes "${SHAPES:-1.5B,7.2B}" --batches "" --variants 12,9 \
  --prefill-batches 1 --prefill-len 4096 --steps 5 --repeats 3 --out "$OUT/prefill-model" > "$OUT/prefill-model.log" 2>&1
echo "model exit $?"; grep -v "^|" "$OUT/prefill-model.log" | tail -12
