#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl): the LoRA kernels' launch configurations
# (benchmarks/bench_lora.py, 1.5B and 7.2B ranks, batch 1, 8, 16), then the whole decode step at
# batch 1 and 8 (bench_decode.py, default variant, CUDA graphs) with the LoRA kernels in each of
# WHOLE (space-separated down_block_c:up_block_r:up_block_c, default: the current default and
# three others), all in one run. Results under $OUT: lora-<card>.* and decode-lora-<config>-<card>.*.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|[0-9]{4}' | head -1 | tr A-Z a-z)
cd benchmarks || exit 1
python3 bench_lora.py --batches 1,8,16 --out "$OUT/lora-${card:-gpu}" 2>&1 | grep -v "^  " | tail -20
for config in ${WHOLE:-128:16:128 512:16:128 512:64:64 1024:64:64}; do
    IFS=: read -r down up_r up_c <<< "$config"
    python3 - "$down" "$up_r" "$up_c" "$OUT/decode-lora-${down}-${up_r}-${up_c}-${card:-gpu}" <<'PY' 2>&1 | grep -E "LoRA|B=|Error"
import sys
import bench_decode
from rwkvstate.ops import lora
lora.DOWN_BLOCK_C, lora.UP_BLOCK_R, lora.UP_BLOCK_C = (int(v) for v in sys.argv[1:4])
print("LoRA", sys.argv[1:4])
bench_decode.main(["--variants", "default", "--shapes", "1.5B,7.2B", "--batches", "1,8", "--prefill-batches", "",
                   "--graphs-only", "--no-reference", "--out", sys.argv[4]])
PY
done
