#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl): the serving benchmark at 1, 64 and 256 streams (LEVELS)
# (bare decode, engine, HTTP server: engine core process, API API processes (default 8: what 256
# streams want on a 16-core H200 host, docs/server.md) and as many load generators (CLIENTS) that
# start together at a barrier), 1.5B shape, fp16 state, 128-token replies; JSON, markdown and
# chart under $OUT/serving-<card>.*. No tests: about 3 minutes with 4 waves; SERVING_S caps it
# (default 330 s). WAVES (default 4) requests per stream: more waves give the steady-window figure
# a longer window.
# CLIENTS load-generator processes (default: as many as API processes). LOAD_CLIENTS: their HTTP
# client, aiohttp (default) or httpx; "aiohttp,httpx" runs each level with both in turn.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|[0-9]{4}' | head -1 | tr A-Z a-z)
timeout "${SERVING_S:-330}" python3 benchmarks/bench_server.py --shape 1.5B --state-dtype fp16 --levels "${LEVELS:-1,64,256}" --waves "${WAVES:-4}" \
    --max-tokens 128 --api-processes "${API:-8}" --client-processes "${CLIENTS:-${API:-8}}" \
    --load-clients "${LOAD_CLIENTS:-aiohttp}" --out "$OUT/serving-${card:-gpu}" </dev/null 2>&1 | tail -20
