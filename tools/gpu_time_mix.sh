#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 8 minutes: the one-launch decode time mix at 1-8
# warps, and whether it pays beyond 8 rows.
# 1. the time-mix tests and the model's default-backend tests, compiled;
# 2. the time mix alone: three kernels against one launch at 1, 2, 4, 8 warps, batches 1-256,
#    H = 32 and 64                                                    -> time-mix-decode-<card>.{json,md}
# 3. decode with CUDA graphs at batches BATCHES (default 1, 8, 64, 256), three shapes, one run:
#    variants 12 (the default), 19 (one launch for every decode batch), 20 (three kernels for every
#    decode batch)                                                      -> decode-time-mix-<card>.{json,md}
# (decode-time-mix-h200 was measured at 64d1742, when the default took one launch up to 8 rows; the
# default has since taken it for every decode batch, so 12 and 19 are now the same)
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_time_mix.py \
  tests/test_kernel_gemv.py -k "fused or defaults or launch_options or release" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${KERNEL_TIMEOUT:-120}" python3 benchmarks/bench_wkv_decode.py --no-wkv --time-mix \
  --out "$OUT/time-mix-decode-$card" > "$OUT/kernel.log" 2>&1
echo "kernel exit $?"; grep -E "^time mix" "$OUT/kernel.log"
timeout "${DECODE_TIMEOUT:-240}" python3 benchmarks/bench_decode.py --variants 12,19,20 --graphs-only --no-reference \
  --batches ${BATCHES:-1,8,64,256} --prefill-batches "" --steps 20 --repeats 3 --out "$OUT/decode-time-mix-$card" \
  > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=" "$OUT/decode.log" | tail -40
