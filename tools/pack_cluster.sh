#!/usr/bin/env bash
# Packs what benchmarks/bench_cluster.py needs on a GPU machine of the device tool (Python 3.12,
# x86-64, no network) into .cluster/ in the repository root (git-ignored via .git/info/exclude):
#   .cluster/whl/      the wheels of ray[serve], redis, fastapi, uvicorn, pyzmq, msgspec that its image lacks
#   .cluster/ray.tar.xz  ray itself, unpacked and stripped (its wheel alone is 79 MB, more than
#                      the 64 MiB a call may carry): without its Java jars, dashboard web client,
#                      RLlib and C++ headers, none of which Ray Serve uses
#   .cluster/redis/    Debian 12's redis-server and its libraries as .deb files (dpkg -x there)
# Run here (with network), then carry .cluster: tools/gpu_cluster.sh unpacks it on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.cluster/' .git/info/exclude 2>/dev/null || echo /.cluster/ >> "$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .cluster && mkdir -p .cluster/whl .cluster/redis /tmp/pack-cluster
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64"
# Missing on the device image (KINDS.md's package list), with the versions the CPU CI resolves; left out
# to stay under the carry limit, as Ray Serve never imports them: py-spy (profiling), virtualenv and its
# needs (pip runtime environments). grpcio-reflection matches the image's grpcio (1.84.0):
WHEELS="ray==2.60.0 redis==8.1.0 fastapi==0.163.2 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4
pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 jsonschema==4.26.0
jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 aiohttp-cors==0.8.1 colorful==0.5.8
opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0 googleapis-common-protos==1.76.0
google-auth==2.63.0 proto-plus==1.29.0 pyasn1==0.6.5 pyasn1-modules==0.4.2 smart-open==9.0.2 opentelemetry-api==1.45.2
opentelemetry-sdk==1.45.2 opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2
opentelemetry-semantic-conventions==0.66b2 watchfiles==1.3.0 websockets==17.4 httptools==0.9.0
python-dotenv==1.2.4 mmh3==5.3.1 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pyrwkv-tokenizer==0.9.1
pyzmq==27.3.0 msgspec==0.23.0 grpcio-reflection==1.84.0"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d /tmp/pack-cluster $WHEELS
mv /tmp/pack-cluster/*.whl .cluster/whl/ && mv .cluster/whl/ray-*.whl /tmp/pack-cluster/
# ray: unpacked, stripped, xz-compressed
rm -rf /tmp/pack-cluster/site && mkdir /tmp/pack-cluster/site
python3 -m zipfile -e /tmp/pack-cluster/ray-*.whl /tmp/pack-cluster/site
(cd /tmp/pack-cluster/site/ray && rm -rf jars dashboard/client/build rllib cpp && find . -name '*.map' -delete)
chmod +x /tmp/pack-cluster/site/ray/core/src/ray/raylet/raylet /tmp/pack-cluster/site/ray/core/src/ray/gcs/gcs_server
tar -C /tmp/pack-cluster/site -cf - . | xz -T2 -9 > .cluster/ray.tar.xz
# redis-server from Debian 12 (its binary lives in redis-tools)
(cd .cluster/redis && apt-get download redis-server redis-tools libjemalloc2 liblzf1 >/dev/null)
du -sh .cluster .cluster/*
