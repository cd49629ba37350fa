#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 9 minutes: the WKV-7 prompt kernel.
# 1. the WKV-7, model and CUDA tests, compiled;
# 2. WKV-7 alone for prompts: step kernel vs prompt kernel and its BLOCK_V (bench_wkv_prompt.py);
# 3. one 4,096-token prefill per shape (0.1B, 1.5B, 7.2B) with the prompt kernel (bench_decode variant
#    12, the default) and with the step kernel (variant 13, the default before), against the fp16 matmul
#    floor, in the same run; decode at batch 1 for both (the same kernels).
# Writes under $OUT: gpu.txt, tests.log, wkv-prompt-<card>.{json,md}, prefill-prompt-<card>.{json,md}, bench.log.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|[0-9]{4}' | head -1 | tr A-Z a-z)
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_wkv7.py \
  tests/test_kernel_model.py tests/test_cuda.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -3 "$OUT/tests.log"
timeout "${WKV_TIMEOUT:-90}" python3 benchmarks/bench_wkv_prompt.py --out "$OUT/wkv-prompt-${card:-gpu}" 2>&1 | grep -v "^|" | head -20
echo "wkv exit $?"
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_decode.py --variants 13,12 --graphs-only --no-reference \
  --batches 1 --prefill-batches 1 --prefill-len 4096 --steps 10 --repeats 3 \
  --out "$OUT/prefill-prompt-${card:-gpu}" > "$OUT/bench.log" 2>&1
echo "bench exit $?"; grep -v "^|" "$OUT/bench.log" | tail -30
