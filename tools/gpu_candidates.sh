#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 8 minutes: two opt-in paths not yet measured on a GPU.
# - the channel mix's "cublas" backend (relu^2 in one in-place pass, the residual add inside the value
#   GEMM), meant for passes beyond 8 rows and prompts (bench_decode variant 18);
# - the one-launch decode time mix (backends["time_mix"] = "triton-fused": prologue, WKV-7 and
#   epilogue of a decode batch in one kernel; variant 19).
# 1. their tests, compiled (channel mix, time mix);
# 2. decode with CUDA graphs at batches BATCHES (default 1, 8, 256) and one 4,096-token prompt, three
#    shapes, one run: variants 12 (the default), 18 and 19      -> decode-candidates-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_channel_mix.py \
  tests/test_kernel_time_mix.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${DECODE_TIMEOUT:-300}" python3 benchmarks/bench_decode.py --variants 12,18,19 --graphs-only --no-reference \
  --batches ${BATCHES:-1,8,256} --prefill-batches 1 --prefill-len 4096 --steps 20 --repeats 3 \
  --out "$OUT/decode-candidates-$card" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=|prefill" "$OUT/decode.log" | tail -30
