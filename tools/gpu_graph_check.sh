#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl or .cluster): the open graph-decode difference
# (docs/benchmarks/decode.md): tools/diag_graph_poison.py with the allocator poisoned, then one
# graph run and one eager run of the all-"torch" configuration under compute-sanitizer's initcheck
# and one graph run under memcheck (the first errors with device backtraces kept), then the two
# CUDA tests that compare graph with eager decode. Results in $OUT/graph/ (5 files).
set -o pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cluster/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
R=$OUT/graph; mkdir -p "$R"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
timeout 150 python3 tools/diag_graph_poison.py --repeats 3 > "$R/diag.txt" 2>&1; tail -6 "$R/diag.txt"
for mode in graph eager; do
  timeout 120 "$CS" --tool initcheck --print-limit 20 --show-backtrace device \
    python3 tools/diag_graph_poison.py --once all-torch "$mode" > "$R/initcheck-$mode.txt" 2>&1
  echo "initcheck $mode: $(grep -c 'Uninitialized' "$R/initcheck-$mode.txt") shown, $(grep 'ERROR SUMMARY' "$R/initcheck-$mode.txt" | head -1)"
done
timeout 150 "$CS" --tool memcheck --print-limit 20 python3 tools/diag_graph_poison.py --once all-torch graph > "$R/memcheck.txt" 2>&1
echo "memcheck: $(grep 'ERROR SUMMARY' "$R/memcheck.txt" | head -1)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernel_gemv.py > "$R/tests.log" 2>&1
tail -3 "$R/tests.log"
