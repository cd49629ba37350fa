#!/usr/bin/env bash
# On a GPU machine of the device tool: the decode/prefill benchmark with the official package beside it.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 benchmarks/bench_decode.py --official --shapes "${SHAPES:-0.1B,1.5B}" --steps "${STEPS:-10}" --out "$OUT/decode" 2>&1 | grep -v "^|" | tail -80
