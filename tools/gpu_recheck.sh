#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl if present; not needed), under 6 minutes
# (internal timeouts 170 + 170 s):
# 1. the new kernels' tests, compiled: the sparse channel mix (with its dead-row and row-list
#    tests), the chunked WKV-7 (explicit backend), LoRA chains, norm+shift, the model end to end,
#    the chunked prefill against the default in test_cuda;
# 2. decode with CUDA graphs, variants 6 (fused f16) and 8 (the default then, 12 now: + LoRA chains,
#    norm+shift, and the channel mix the runtime picks: cuBLAS now, the sparse kernel in the run of
#    docs/benchmarks/decode-recheck-h200.json) at 0.1B/1.5B/7.2B, batches 1 and 256; one 4,096-token prefill per
#    shape for both; the feed-forward alone at activation densities 0.1, 0.5 and 1.
# Writes under $OUT: gpu.txt, tests.log, decode-recheck.{json,md} (at the end), decode-recheck.log.
set -o pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -q -p no:cacheprovider tests/test_kernel_channel_mix.py \
  tests/test_kernel_wkv7.py tests/test_kernel_lora.py tests/test_kernel_model.py tests/test_kernel_token_shift.py \
  tests/test_cuda.py -k "test_kernel_channel_mix or chunk or default_backend or norm_shift or test_kernel_lora or test_kernel_model" \
  > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -5 "$OUT/tests.log"
timeout "${BENCH_TIMEOUT:-170}" python3 benchmarks/bench_decode.py --variants 6,8 --graphs-only --no-reference \
  --batches 1,256 --prefill-batches 1 --prefill-len 4096 --ffn-densities 0.1,0.5,1 --steps 10 --repeats 3 \
  --out "$OUT/decode-recheck" > "$OUT/decode-recheck.log" 2>&1
echo "bench exit $?"; grep -v "^|" "$OUT/decode-recheck.log" | tail -60
