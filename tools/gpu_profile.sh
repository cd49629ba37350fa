#!/usr/bin/env bash
# On an H200 of the device tool: where one decode step's time goes (0.1B/1.5B/7.2B, batch 1
# and 256, random fp16 weights), kernel by kernel, plus one 4,096-token prefill per shape.
# Writes under $OUT: gpu.txt, profile.json, profile.md, profile.log, and where ncu works
# ncu-1.5B-b1.csv / ncu-7.2B-b1.csv (DRAM bytes and time of ~2 layers' kernels, caches flushed).
set -o pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${PROFILE_TIMEOUT:-270}" python3 tools/profile_step.py --out "$OUT" --shapes "${SHAPES:-0.1B,1.5B,7.2B}" \
  > "$OUT/profile.log" 2>&1
echo "profile exit $?"; grep -v "^|" "$OUT/profile.log" | tail -20
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  for shape in 1.5B 7.2B; do
    # skip ~3 layers' kernels after the range opens, then measure 60 (about two layers)
    timeout "${NCU_TIMEOUT:-45}" "$NCU" --clock-control none --nvtx --nvtx-include "step/" --launch-skip 90 \
      --launch-count 60 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --csv \
      --log-file "$OUT/ncu-$shape-b1.csv" python3 tools/profile_step.py --ncu-step --shapes "$shape" --batches 1 \
      > /dev/null 2>&1
    echo "ncu $shape exit $? ($(wc -l < "$OUT/ncu-$shape-b1.csv" 2>/dev/null) lines)"
  done
fi
