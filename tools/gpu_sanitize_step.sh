#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl): the decode graphs' kernel sequence run eagerly
# with their padding (tools/diag_graph_step.py --decode-step) under compute-sanitizer's memcheck
# and initcheck, with torch's caching allocator off (every tensor its own allocation, so an access
# past a tensor's end or a read of bytes never written is seen). Results in $OUT/sanitize/.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
R=$OUT/sanitize; mkdir -p "$R"
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck initcheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_S:-150}" "$CS" --tool "$tool" --print-limit 30 \
    python3 tools/diag_graph_step.py --decode-step > "$R/$tool.txt" 2>&1
  echo "$tool: $(grep -c '=========     ' "$R/$tool.txt") lines of reports; $(grep 'ERROR SUMMARY' "$R/$tool.txt" | head -1)"
  grep -m 6 -E "^========= (Invalid|Uninitialized)|Kernel|by thread" "$R/$tool.txt" | head -12
done
