#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 9 minutes: the LoRA downs in the r/k/v launch.
# 1. the LoRA, time-mix and GEMV tests and test_cuda.py, compiled              -> tests.log
# 2. decode with CUDA graphs at batches BATCHES (default 1, 8), three shapes, one run: variants 12
#    (the default), 23 (the two LoRA kernels, on the second stream in graphs), 24 (lora "fused":
#    the downs in the r/k/v launch, the ups in their own)          -> decode-lora-fused-<card>.{json,md}
# (decode-lora-fused-h200 was measured at b01837e, when the default of decode batches of 1-8 was a
# "fused" that computed the ups inside the one-launch time mix, since removed as slower, and 24 was
# named "fused-down"; lora "fused" is now 24's path, the default for one row up to C = 2048)
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_lora.py \
  tests/test_kernel_time_mix.py tests/test_cuda.py \
  "tests/test_kernel_gemv.py::test_cuda_defaults_choose_by_batch" "tests/test_kernel_gemv.py::test_cuda_model_decode_and_graphs_with_gemv" \
  "tests/test_kernel_gemv.py::test_cuda_launch_options_change_no_bit" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
timeout "${DECODE_TIMEOUT:-240}" python3 benchmarks/bench_decode.py --variants 12,23,24 --graphs-only --no-reference \
  --batches ${BATCHES:-1,8} --prefill-batches "" --steps 20 --repeats 3 --out "$OUT/decode-lora-fused-$card" \
  > "$OUT/decode.log" 2>&1
echo "decode exit $?"; grep -E "graphs=" "$OUT/decode.log" | tail -40
