#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 8 minutes: the WKV-7 step kernel's one-token form
# for decode batches.
# 1. the WKV-7 tests and the model's default-backend tests, compiled;
# 2. the kernel alone: launch configurations and both forms, batches 1-256, H = 32 and 64
#                                                               -> wkv-decode-<card>.{json,md}
# 3. decode with CUDA graphs at batches BATCHES (default 8, 256), three shapes, one run: variants 12
#    (the default), 22 (the token-loop form), 12 again                -> decode-wkv-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_wkv7.py \
  tests/test_kernel_gemv.py -k "not chunked" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${KERNEL_TIMEOUT:-150}" python3 benchmarks/bench_wkv_decode.py --out "$OUT/wkv-decode-$card" > "$OUT/kernel.log" 2>&1
echo "kernel exit $?"; grep -E "^B=" "$OUT/kernel.log"
timeout "${DECODE_TIMEOUT:-200}" python3 benchmarks/bench_decode.py --variants 12,22,12 --graphs-only --no-reference \
  --batches ${BATCHES:-8,256} --prefill-batches "" --steps 20 --repeats 3 --out "$OUT/decode-wkv-$card" \
  > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=|prefill" "$OUT/decode.log" | tail -30
