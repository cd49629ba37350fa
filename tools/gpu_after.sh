#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl), under 9 minutes: the defaults as they stand, compiled and
# profiled.
# 1. the tests of the kernels and paths whose defaults changed on 2026-12-01 (one-launch time mix for
#    every decode batch, the folded cuBLAS feed-forward, the one-token WKV form, r/k/v unsplit), and the
#    CUDA model/engine tests;
# 2. tools/gpu_profile.sh: where a decode step's time goes, kernel by kernel, three shapes at batch 1 and
#    256, one 4,096-token prompt each, ncu's DRAM counts of two layers at batch 1.
set -o pipefail
. tools/gpu_env.sh
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_time_mix.py \
  tests/test_kernel_channel_mix.py tests/test_cuda.py tests/test_kernel_wkv7.py tests/test_kernel_gemv.py \
  -k "not chunked and not chunk_" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -8
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-250} NCU_TIMEOUT=${NCU_TIMEOUT:-40} bash tools/gpu_profile.sh
