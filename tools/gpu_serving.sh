#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl): the engine's CUDA tests (graph steps fed from
# the device, sampling), then the serving benchmark: bare decode, engine and HTTP server at 1, 64
# and 256 streams, 1.5B shape, fp16 state (JSON, markdown and chart under $OUT/serving-*).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|[0-9]{4}' | head -1 | tr A-Z a-z)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py tests/test_sampling.py \
    2>&1 | tee "$OUT/tests-serving-cuda.log" | tail -8
timeout 320 python3 benchmarks/bench_server.py --shape 1.5B --state-dtype fp16 --levels 1,64,256 --waves 2 \
    --max-tokens 128 --api-processes 4 --client-processes 4 --out "$OUT/serving-${card:-gpu}" 2>&1 | tail -20
