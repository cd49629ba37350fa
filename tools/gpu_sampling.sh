#!/usr/bin/env bash
# On a GPU machine of the device tool: the sampling and engine tests with the compiled kernel,
# then the sampling benchmark (JSON + markdown under $OUT/sampling).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_sampling.py tests/test_engine.py tests/test_cuda.py 2>&1 | tee "$OUT/tests-sampling-cuda.log" | tail -15
timeout 300 python3 benchmarks/bench_sampling.py --out "$OUT/sampling" 2>&1 | tail -45
