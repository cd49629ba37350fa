#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), about 3 minutes: the LoRA down kernel split over ranges of C
# (ops/lora.py DOWN_SPLITS; opt-in until measured).
# 1. the LoRA kernel tests, compiled;
# 2. decode with CUDA graphs, SHAPES (default 1.5B, 7.2B) at BATCHES (default 1, 8): variants 12 (the
#    default, one range), 23 (2 ranges), 24 (4 ranges), 12 again     -> decode-lora-split-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-60}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_lora.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8; tail -c 300 "$OUT/tests.log"
timeout "${DECODE_TIMEOUT:-130}" python3 benchmarks/bench_decode.py --variants 12,23,24,12 --shapes ${SHAPES:-1.5B,7.2B} \
  --graphs-only --no-reference --batches ${BATCHES:-1,8} --prefill-batches "" --steps 20 --repeats 3 \
  --out "$OUT/decode-lora-split-$card" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=" "$OUT/decode.log" | tail -20
