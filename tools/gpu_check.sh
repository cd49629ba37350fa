#!/usr/bin/env bash
# On a GPU machine of the device tool: the test suite on CUDA (kernels compiled), the
# state-precision harness on the bundled model, and a small decode benchmark as a smoke test.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/tests-cuda.log" | tail -12
python3 -m rwkvstate.cli eval-state --device cuda --dtype fp32 --stdlib .corpus/stdlib-heldout --out "$OUT/state-precision" 2>&1 | tail -14
timeout 120 python3 benchmarks/bench_decode.py --shapes 0.1B --batches 8 --prefill-batches 1 --prefill-len 128 --steps 3 2>&1 | tail -25
