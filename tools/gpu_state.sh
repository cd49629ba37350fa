#!/usr/bin/env bash
# On a GPU machine of the device tool: the state-lifecycle tests on CUDA (kernels compiled), then
# the state benchmark. STAGE=quality runs the snapshot-format quality harness instead.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ "${STAGE:-bench}" = quality ]; then
  python3 -m rwkvstate.cli eval-state --device cuda --dtype fp32 --variants snapshots --stdlib .corpus/stdlib-heldout \
    --docs "${DOCS:-16}" --out "$OUT/state-precision-snapshots" 2>&1 | tail -16
  exit
fi
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_snapshot_formats.py tests/test_cuda.py tests/test_lifecycle.py} 2>&1 | tee "$OUT/tests-cuda.log" | tail -8
python3 benchmarks/bench_state.py --out "$OUT/state" 2>&1 | grep -v "^|" | tail -20
cp "$OUT/state.md" "$OUT/state-summary.md" 2>/dev/null; true
