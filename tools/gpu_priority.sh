#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 6 minutes: the LoRA stream at high CUDA priority.
# 1. the launch-option tests (the second stream's results bit for bit against one stream), compiled;
# 2. decode with CUDA graphs at batches BATCHES (default 1, 8, 64, 256), three shapes, one run:
#    variants 12 (the default: high priority), 23 (normal priority), 12 again
#                                                                 -> decode-priority-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gemv.py \
  -k "launch_options or lora_stream" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${DECODE_TIMEOUT:-270}" python3 benchmarks/bench_decode.py --variants 12,23,12 --graphs-only --no-reference \
  --batches ${BATCHES:-1,8,64,256} --prefill-batches "" --steps 20 --repeats 3 --out "$OUT/decode-priority-$card" \
  > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=" "$OUT/decode.log" | tail -40
