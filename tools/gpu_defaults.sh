#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 8 minutes: the defaults of 2026-12-01 (one-launch
# time mix for decode batches of at most 8, folded cuBLAS feed-forward beyond and for prompts).
# 1. the tests of the kernels and options involved, compiled;
# 2. decode with CUDA graphs at batches BATCHES (default 1, 8, 256) and one 4,096-token prompt, three
#    shapes, one run: variants 12 (the default), 20 (three-kernel time mix), 21 (reference
#    feed-forward) and 12 again (a second timing of the default, after the others)
#                                                                   -> decode-defaults-<card>.{json,md}
# (decode-defaults-h200 was measured at a89daae, with three more variants between 20 and 21 that read
# weights into L2 ahead of use, since removed: docs/benchmarks/decode.md; the default has since taken
# the one-launch time mix for every decode batch)
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gemv.py \
  tests/test_kernel_channel_mix.py tests/test_kernel_time_mix.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${DECODE_TIMEOUT:-330}" python3 benchmarks/bench_decode.py --variants ${VARIANTS:-12,20,21,12} --graphs-only \
  --no-reference --batches ${BATCHES:-1,8,256} --prefill-batches 1 --prefill-len 4096 --steps 20 --repeats 3 \
  --out "$OUT/decode-defaults-$card" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=|prefill" "$OUT/decode.log" | tail -60
