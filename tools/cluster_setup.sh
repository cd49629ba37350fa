# Sourced by tools/gpu_cluster.sh and tools/gpu_round.sh on a device machine (carry .cluster, from
# tools/pack_cluster.sh): installs the carried wheels (and .cluster/extra's, when there are any),
# unpacks Ray and redis-server, and exports the paths they need.
extra_wheels=(); compgen -G ".cluster/extra/*.whl" >/dev/null && extra_wheels=(.cluster/extra/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .cluster/whl/*.whl "${extra_wheels[@]}" || exit 1
tar -C /tmp/site -xJf .cluster/ray.tar.xz || exit 1
mkdir -p /tmp/redis && for f in .cluster/redis/*.deb; do dpkg -x "$f" /tmp/redis; done
export PATH=/tmp/site/bin:$PATH LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
