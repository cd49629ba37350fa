#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 10 minutes: the sparse feed-forward.
# 1. the channel-mix, GEMV, LoRA and model tests, compiled;
# 2. bench_ffn.py: the value projection (sparse-input GEMV / dense GEMV / cuBLAS) at densities
#    1, 0.5, 0.1, the key projection, the whole channel mix per backend; 0.1B, 1.5B, 7.2B widths,
#    batches 1, 2, 4, 8                                                     -> ffn-<card>.{json,md}
# 3. decode with CUDA graphs, the default (bench_decode variant 12) and the default with the sparse
#    feed-forward for every decode batch of <= 16 rows (variant 14), batches BATCHES (default
#    1,256), three shapes, one run                                        -> decode-ffn-<card>.*
#    (decode-ffn-h200 ran 12, 14 and a variant 15 that then put the LoRA chains on a second stream;
#    that is the default now, and 15 is the previous default)
# 4. bench_ffn.py --sweep: the sparse kernel's launch configurations, batch 1 -> ffn-sweep-<card>.*
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_channel_mix.py \
  tests/test_kernel_gemv.py ${MORE_TESTS-tests/test_kernel_lora.py tests/test_kernel_model.py} > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -3 "$OUT/tests.log"
(cd benchmarks && timeout "${FFN_TIMEOUT:-150}" python3 bench_ffn.py --out "$OUT/ffn-$card") > "$OUT/ffn.log" 2>&1
echo "ffn exit $?"; grep -E "^\| (0.1B|1.5B|7.2B) \| (channel|value) \| 1 \|" "$OUT/ffn.log"
timeout "${DECODE_TIMEOUT:-170}" python3 benchmarks/bench_decode.py --variants ${VARIANTS:-12,14} --graphs-only \
  --no-reference --batches ${BATCHES:-1,256} --prefill-batches "" --steps 20 --repeats 3 --out "$OUT/decode-ffn-$card" \
  > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep "graphs=" "$OUT/decode.log" | tail -30
(cd benchmarks && timeout "${SWEEP_TIMEOUT:-150}" python3 bench_ffn.py --sweep --cases value --batches 1 \
  --shapes ${SWEEP_SHAPES:-0.1B,1.5B,7.2B} --densities 1,0.5 --calls 10 --out "$OUT/ffn-sweep-$card") > "$OUT/sweep.log" 2>&1
echo "sweep exit $?"; for s in 0.1B 1.5B 7.2B; do for d in 1.00 0.50; do grep "^| $s | 1 | $d |" "$OUT/sweep.log" | head -3; done; done
