#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl, or .cluster): the GEMV kernel (ops/gemv.py), in at most
# about BUDGET_S (default 290) seconds:
#   1. its tests compiled on the GPU (tests/test_kernel_gemv.py with the 1.5B/7.2B widths and
#      CUDA-graph decode, and the model/channel-mix kernel tests that use it)
#   2. benchmarks/bench_gemv.py: r/k/v grouped, the output projection and the two feed-forward
#      projections against F.linear (cuBLAS), 1.5B and 7.2B widths, batch 1/2/4/8  -> gemv-h200.*
#   3. decode tokens/s with CUDA graphs at batches 1, 8, 64, 256, bench_decode variants 8 (the
#      previous default), 10 (GEMV projections), 11 (also the feed-forward) and 12 (the default:
#      GEMV for r/k/v and the feed-forward up to batch 8, batched GEMMs beyond) -> decode-gemv-h200.*
#   4. bench_gemv --sweep: launch configurations for r/k/v and the output at batch 1 and 8
#                                                                              -> gemv-sweep-h200.*
# Results and logs land in $OUT/gemv/ (JSON + markdown per stage); $OUT/gemv/summary.txt is the short log.
set -o pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
elif compgen -G ".cluster/whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cluster/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
R=$OUT/gemv; mkdir -p "$R"
SHAPES=${SHAPES:-1.5B,7.2B}
start=$SECONDS
budget() { local left=$((${BUDGET_S:-290} - (SECONDS - start))); echo $((left < $1 ? (left > 10 ? left : 10) : $1)); }
log() { echo "$*" | tee -a "$R/summary.txt"; }
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
log "$(python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
timeout "$(budget 90)" python3 -m pytest -rA -p no:cacheprovider tests/test_kernel_gemv.py tests/test_kernel_model.py \
  tests/test_kernel_channel_mix.py > "$R/tests-cuda.log" 2>&1
log "tests: rc $? after $((SECONDS - start)) s"; tail -2 "$R/tests-cuda.log" | tee -a "$R/summary.txt"
timeout "$(budget 80)" python3 benchmarks/bench_gemv.py --shapes "$SHAPES" --out "$R/gemv-h200" > "$R/gemv.log" 2>&1
log "bench_gemv: rc $? after $((SECONDS - start)) s"; grep "^|" "$R/gemv-h200.md" 2>/dev/null | tee -a "$R/summary.txt"
timeout "$(budget 100)" python3 benchmarks/bench_decode.py --variants 8,10,11,12 --batches ${BATCHES:-1,8,64,256} --graphs-only --prefill-batches "" \
  --shapes "$SHAPES" --steps 20 --repeats 3 --no-reference --out "$R/decode-gemv-h200" > "$R/decode.log" 2>&1
log "decode: rc $? after $((SECONDS - start)) s"; grep "^| 1 " "$R/decode-gemv-h200.md" 2>/dev/null | tee -a "$R/summary.txt"
timeout "$(budget 120)" python3 benchmarks/bench_gemv.py --shapes "$SHAPES" --cases rkv,output --batches 1,8 --sweep \
  --repeats 2 --out "$R/gemv-sweep-h200" > "$R/sweep.log" 2>&1
log "sweep: rc $? after $((SECONDS - start)) s"
log "done after $((SECONDS - start)) s"
