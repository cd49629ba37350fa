#!/usr/bin/env bash
# On nvidia-h200-x2 of the device tool: benchmarks/bench_cluster.py (two replicas against one at
# the 1.5B shape, 256 streams each; moving a session; store bytes per turn). Needs .cluster/
# from tools/pack_cluster.sh, carried: Ray (stripped), the wheels the image lacks, redis-server.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cluster/whl/*.whl || exit 1
tar -C /tmp/site -xJf .cluster/ray.tar.xz || exit 1
mkdir -p /tmp/redis && for f in .cluster/redis/*.deb; do dpkg -x "$f" /tmp/redis; done
export PATH=/tmp/site/bin:$PATH LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
/tmp/redis/usr/bin/redis-server --version || exit 1
python3 benchmarks/bench_cluster.py --shape 1.5B --streams "${STREAMS:-256}" --max-tokens "${TOKENS:-256}" \
    --redis-server /tmp/redis/usr/bin/redis-server --out "$OUT/cluster-h200x2" 2>&1 | tee "$OUT/log" | grep -v "^(.*pid=" | tail -60
