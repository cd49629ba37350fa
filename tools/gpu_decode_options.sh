#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 10 minutes: the decode defaults of the sparse
# feed-forward, the LoRA stream and dependent launches.
# 1. the channel-mix, GEMV, model and CUDA tests, compiled (graph decode with every option);
# 2. decode with CUDA graphs at batches 1, 8, 256 and one 4,096-token prompt, three shapes, one run:
#    bench_decode variant 15 (the previous default: one stream, dense GEMV feed-forward, no dependent
#    launches), 16 (the default without dependent launches), 17 (dependent launches triggered at
#    each kernel's start) and 12 (the default: triggered at the end)
#                                                                  -> decode-options-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-290}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernel_channel_mix.py \
  tests/test_kernel_gemv.py tests/test_kernel_model.py tests/test_cuda.py} > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -12
timeout "${DECODE_TIMEOUT:-260}" python3 benchmarks/bench_decode.py --variants ${VARIANTS:-15,16,17,12} --graphs-only \
  --no-reference --batches ${BATCHES:-1,8,256} --prefill-batches 1 --prefill-len 4096 --steps 20 --repeats 3 \
  --out "$OUT/decode-options-$card" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=|prefill" "$OUT/decode.log" | tail -40
