#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 9 minutes: the many-rows LoRA kernels as the
# default of decode batches beyond 16 rows, and the GEMV kernel's token tiles for every projection.
# 1. the LoRA, GEMV and channel-mix tests and the time mix's backend choice (or TESTS), compiled -> tests.log
# 2. decode with CUDA graphs at BATCHES (default 64, 256) and one 4,096-token prompt, the three
#    shapes, variants 12 (the default: lora "triton" for decode), 28 (lora "bmm", the previous
#    default beyond 16 rows) and 29 (gemv "triton-all"); or VARIANTS -> decode-rows-default-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernel_lora.py \
  tests/test_kernel_gemv.py tests/test_kernel_channel_mix.py tests/test_kernel_time_mix.py -k "lora or gemv or cuda or model or in_place"} \
  > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${DECODE_TIMEOUT:-300}" python3 benchmarks/bench_decode.py --variants ${VARIANTS:-12,28,29} --graphs-only --no-reference \
  --batches ${BATCHES:-64,256} --prefill-batches 1 --prefill-len 4096 --steps 20 --repeats 3 \
  --out "$OUT/decode-rows-default-$card" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=|prefill" "$OUT/decode.log" | tail -40
