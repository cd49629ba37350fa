#!/usr/bin/env bash
# On an H200 of the device tool (carry .whl and BASE, an ignored export of an earlier commit's src/,
# benchmarks/ and tools/), under 5 minutes: the default decode step of that commit and of this tree
# on one machine, batches 1, 8, 64, 256 and one 4,096-token prompt, the three shapes.
# Writes under $OUT: decode-session-base-<card>.{json,md}, decode-session-<card>.{json,md}, *.log.
set -o pipefail
. tools/gpu_env.sh
base=${BASE:-.base}
run() {  # run <src root> <out stem>
  (cd "$1" && PYTHONPATH=/tmp/site:$PWD/src timeout "${DECODE_TIMEOUT:-130}" python3 benchmarks/bench_decode.py --variants 12 \
    --graphs-only --no-reference --batches ${BATCHES:-1,8,64,256} --prefill-batches 1 --prefill-len 4096 --steps 20 \
    --repeats 3 --out "$OUT/$2-$card" > "$OUT/$2.log" 2>&1)
  echo "$2 exit $?"; grep -E "graphs=|prefill" "$OUT/$2.log" | tail -16
}
run "$base" decode-session-base
run . decode-session
