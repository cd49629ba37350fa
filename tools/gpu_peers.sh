#!/usr/bin/env bash
# On an H200 of the device tool, carrying .whl (the official rwkv package) and .peers (an export of
# Albatross, benchmarks/bench_albatross.py says which): rwkvstate's default path, the official package
# and Albatross on the same machine, under 10 minutes. SHAPES (default 1.5B,0.1B): decode at batch 1 and
# 256 and one 4,096-token prefill of ours (bench_decode.py) and the official package at batch 1, then
# Albatross per shape (its CUDA extensions compile once, about 95 s).
# Writes under $OUT: gpu.txt, peers-<card>.{json,md}, albatross-<shape>-<card>.json, peers.log.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|[0-9]{4}' | head -1 | tr A-Z a-z)
shapes=${SHAPES:-1.5B,0.1B}
timeout "${OURS_TIMEOUT:-200}" python3 benchmarks/bench_decode.py --official --official-shapes "$shapes" --variants default \
  --shapes "$shapes" --graphs-only --no-reference --batches 1,256 --prefill-batches 1 --prefill-len 4096 \
  --out "$OUT/peers-${card:-gpu}" > "$OUT/peers.log" 2>&1
echo "ours exit $?"; grep -v "^|" "$OUT/peers.log" | grep -E "B=|prefill|official" | tail -12
for shape in ${shapes//,/ }; do
  timeout "${PEER_TIMEOUT:-240}" python3 benchmarks/bench_albatross.py --shape "$shape" \
    --out "$OUT/albatross-$shape-${card:-gpu}.json" >> "$OUT/peers.log" 2>&1
  echo "albatross $shape exit $?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print({k: round(v['peer_bench']['tokens_per_s']) for k, v in d['results'].items()}, d.get('check_vs_ours'))" "$OUT/albatross-$shape-${card:-gpu}.json"
done
