#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 5 minutes: 16-column GEMV tiles where they keep K
# whole (ops/gemv.py NARROW_TILES; of the defaults only the 0.1B r/k/v projection changes).
# 1. the GEMV tests, compiled;
# 2. decode with CUDA graphs, 0.1B and 1.5B, batches 1 and 8: variants 12 (the default), 23 (32-column
#    tiles), 12 again                                                  -> decode-tiles-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gemv.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${DECODE_TIMEOUT:-150}" python3 benchmarks/bench_decode.py --variants 12,23,12 --shapes 0.1B,1.5B --graphs-only \
  --no-reference --batches 1,8 --prefill-batches "" --steps 20 --repeats 3 --out "$OUT/decode-tiles-$card" \
  > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=" "$OUT/decode.log" | tail -20
