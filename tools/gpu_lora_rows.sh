#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 9 minutes: the LoRA chains of many rows (batches
# beyond 16, prompts) in the two token-tile kernels (ops/lora.py lora_rows_triton) against the
# batched GEMMs.
# 1. the LoRA tests and the GEMV file's model tests (or TESTS), compiled             -> tests.log
# 1b. per-kernel times of the configurations (tools/diag_lora_rows.py, eager)        -> diag.log
# 2. the chains alone at BATCHES_OP rows (default 64, 256, 4096), 1.5B and 7.2B ranks, in the
#    ROWS_CONFIGS launch configurations, beside bmm and torch                        -> lora-rows-<card>.{json,md}
# 3. decode with CUDA graphs at BATCHES (default 64, 256) and one 4,096-token prompt, the three
#    shapes, variants 12 (the default) and 27 (lora "triton" for every pass); or VARIANTS
#                                                                                    -> decode-lora-rows-<card>.{json,md}
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernel_lora.py \
  tests/test_kernel_gemv.py -k "lora or batched or model or cuda"} > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout 120 python3 tools/diag_lora_rows.py 2>&1 | grep -v -i warn > "$OUT/diag.log"; echo "diag exit $?"; cat "$OUT/diag.log"
(cd benchmarks && timeout "${OP_TIMEOUT:-150}" python3 bench_lora.py --batches ${BATCHES_OP:-64,256,4096} \
  --shapes 1.5B,7.2B --out "$OUT/lora-rows-$card" > "$OUT/lora.log" 2>&1)
echo "lora exit $?"; grep -E " B=" "$OUT/lora.log" | tail -80
timeout "${DECODE_TIMEOUT:-230}" python3 benchmarks/bench_decode.py --variants ${VARIANTS:-12,27} --graphs-only --no-reference \
  --batches ${BATCHES:-64,256} --prefill-batches 1 --prefill-len 4096 --steps 20 --repeats 3 \
  --out "$OUT/decode-lora-rows-$card" > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=|prefill" "$OUT/decode.log" | tail -40
