#!/usr/bin/env bash
# On nvidia-h200-x2 of the device tool: benchmarks/bench_cluster.py (two replicas against one at
# the 1.5B shape, 256 streams each; moving a session; store bytes per turn). Needs .cluster/
# from tools/pack_cluster.sh, carried: Ray (stripped), the wheels the image lacks, redis-server.
set -o pipefail
. tools/cluster_setup.sh
/tmp/redis/usr/bin/redis-server --version || exit 1
python3 benchmarks/bench_cluster.py --shape 1.5B --streams "${STREAMS:-256}" --max-tokens "${TOKENS:-256}" \
    --redis-server /tmp/redis/usr/bin/redis-server --out "$OUT/cluster-h200x2" 2>&1 | tee "$OUT/log" | grep -v "^(.*pid=" | tail -60
