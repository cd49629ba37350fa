#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl for the official rwkv package), under 8 minutes
# (internal timeouts 50 + 60 + 290 + 70 s):
# 1. the new kernels' tests, compiled (chunked WKV-7, LoRA chains, norm+shift, the model end to end);
# 2. WKV-7 alone for prefill: token-by-token vs chunked-parallel kernel (and fla-core when installed),
#    errors against the float32 recurrence, and the chunked kernel's launch configurations;
# 3. decode before/after at 0.1B/1.5B/7.2B, batches 1/8/64/256, CUDA graphs, share of the dense floor:
#    variant 6 fused f16, 7 + sparse channel mix, 8 + LoRA chains in two launches and residual add + layer
#    norm + token shift in one launch (the default then; variant 12 is now); one 4,096-token prefill per shape
#    (variants 6 and 8) against the fp16 matmul floor; the feed-forward alone at activation densities
#    0.1 and 1; the official package at batch 1 beside ours (the log has every row if the timeout hits);
# 4. the kernel profile of the new code (the model's default backends on CUDA) at batch 1.
# Writes under $OUT: gpu.txt, tests.log, prefill-chunked.{json,md}, prefill-chunked.log, decode-final.{json,md},
# decode-final.log, profile.{json,md}, profile.log.
set -o pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-50}" python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_wkv7.py tests/test_kernel_lora.py \
  tests/test_kernel_model.py tests/test_kernel_token_shift.py tests/test_cuda.py \
  -k "chunk or norm_shift or test_kernel_lora or test_kernel_model" > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -3 "$OUT/tests.log"
timeout "${PREFILL_TIMEOUT:-60}" python3 benchmarks/bench_wkv_chunked.py --quick --out "$OUT/prefill-chunked" > "$OUT/prefill-chunked.log" 2>&1
echo "prefill exit $?"; grep "^|" "$OUT/prefill-chunked.log" | head -20
OFFICIAL=$(python3 -c "import rwkv" 2>/dev/null && echo "--official --official-shapes 0.1B,1.5B")
timeout "${BENCH_TIMEOUT:-290}" python3 benchmarks/bench_decode.py $OFFICIAL --variants 6,7,8 --graphs-only --no-reference \
  --batches 1,8,64,256 --prefill-batches 1 --prefill-len 4096 --ffn-densities 0.1,1 --steps 10 --repeats 3 \
  --out "$OUT/decode-final" > "$OUT/decode-final.log" 2>&1
echo "bench exit $?"; grep -v "^|" "$OUT/decode-final.log" | tail -60
timeout "${PROFILE_TIMEOUT:-70}" python3 tools/profile_step.py --out "$OUT" --shapes 0.1B,1.5B,7.2B --batches 1 \
  --prefill-len 0 > "$OUT/profile.log" 2>&1
echo "profile exit $?"; grep -v "^|" "$OUT/profile.log" | tail -8
