#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 9 minutes: a split K added by the GEMV kernel
# itself (the split that completes an output tile adds every split's sums; ops/gemv.py SPLIT_REDUCE)
# instead of a second launch, and the output projection on the GEMV kernel.
# 1. the GEMV, channel-mix and LoRA tests and test_cuda.py (or TESTS), compiled      -> tests.log
# 2. decode with CUDA graphs at batches BATCHES (default 1, 8), three shapes, one run: variants 12
#    (the default), 26 (split K added by a second launch), 25 (+ the output projection on the
#    GEMV kernel), 23 (the LoRA chains in their two kernels); or VARIANTS
#                                                                 -> decode-split-reduce-<card>.{json,md}
# (decode-split-reduce-first-h200 was measured at 0b3b77e, with the first in-kernel form, which
# added one row after another; decode-split-reduce-h200 at 6be0393 with VARIANTS=12,26 and
# BATCHES=1,2,4,8. In both the default added every split K in the kernel; it now does so only
# up to 2048 outputs)
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernel_gemv.py \
  tests/test_kernel_channel_mix.py tests/test_kernel_lora.py tests/test_cuda.py} > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${DECODE_TIMEOUT:-260}" python3 benchmarks/bench_decode.py --variants ${VARIANTS:-12,26,25,23} --graphs-only --no-reference \
  --batches ${BATCHES:-1,8} --prefill-batches "" --steps 20 --repeats 3 --out "$OUT/decode-split-reduce-$card" \
  > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=" "$OUT/decode.log" | tail -40
