#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl or .cluster): graph decode against eager decode
# after other engines' graphs were dropped (docs/benchmarks/decode.md), with each DecodeGraphs on
# a capture stream of its own (runtime/graphs.py) and, for comparison, every one on one shared
# stream (the behaviour before): tests/test_cuda.py's dropped-graphs check, then
# tools/diag_graph_poison.py with the allocator poisoned, then the CUDA tests that compare graph
# with eager decode. Results in $OUT/graph/ (5 files). REPEATS (default 4) runs per check.
set -o pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cluster/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
R=$OUT/graph; mkdir -p "$R"
N=${REPEATS:-4}
for mode in own shared; do
  flag=$([ "$mode" = shared ] && echo --shared-stream)
  timeout 120 python3 tools/diag_graph_poison.py --dropped --repeats "$N" $flag > "$R/dropped-$mode.txt" 2>&1
  tail -1 "$R/dropped-$mode.txt"
  timeout 200 python3 tools/diag_graph_poison.py --repeats "${POISON_REPEATS:-2}" $flag > "$R/poison-$mode.txt" 2>&1
  tail -6 "$R/poison-$mode.txt"
done
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernel_gemv.py > "$R/tests.log" 2>&1
tail -3 "$R/tests.log"
