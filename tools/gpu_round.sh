#!/usr/bin/env bash
# On nvidia-h200-x2 of the device tool, carry .cluster (tools/pack_cluster.sh, plus the serving
# wheels in .cluster/extra): the serving benchmark on GPU 0 (SERVING_ARGS), then
# benchmarks/bench_cluster.py on both GPUs (CLUSTER_ARGS; a second pass with CLUSTER_ARGS2 if set).
set -o pipefail
. tools/cluster_setup.sh
if [ -n "${SERVING_ARGS:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout "${SERVING_S:-200}" python3 benchmarks/bench_server.py --shape 1.5B --state-dtype fp16 \
      --waves 2 --max-tokens 128 $SERVING_ARGS --out "$OUT/serving-h200" </dev/null 2>&1 | tail -8
fi
n=0
for extra in "${CLUSTER_ARGS:-}" ${CLUSTER_ARGS2:+"$CLUSTER_ARGS2"}; do
  n=$((n + 1))
  timeout "${CLUSTER_S:-200}" python3 benchmarks/bench_cluster.py --shape 1.5B --streams 256 --max-tokens 256 \
      --redis-server /tmp/redis/usr/bin/redis-server --out "$OUT/cluster-$n" $extra 2>&1 | tee "$OUT/log$n" \
      | grep -v "^(.*pid=\|INFO\|WARNING" | tail -30
done
