#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl and .corpus). STAGE picks the job:
#   impact   rwkvstate bench impact (docs/impact.md and its charts)
#   tests    the whole test suite on CUDA, then the state benchmark
#   server   the HTTP server under concurrent load
#   state    the state benchmark alone
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${STAGE:?}" in
  impact)
    python3 -m rwkvstate.cli bench impact --out "$OUT/impact" --doc "$OUT/impact.md" ${ARGS:-} 2>&1 | tail -30 ;;
  tests)
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/tests-cuda.log" | tail -6
    python3 benchmarks/bench_state.py --out "$OUT/state" > "$OUT/state.log" 2>&1; tail -3 "$OUT/state.log" ;;
  state)
    python3 benchmarks/bench_state.py --out "$OUT/state" > "$OUT/state.log" 2>&1; tail -3 "$OUT/state.log" ;;
  server)
    python3 benchmarks/bench_server.py --shape "${SHAPE:-1.5B}" --out "$OUT/server" ${ARGS:-} 2>&1 | tail -25 ;;
esac
