#!/usr/bin/env bash
# On a GPU machine of the device tool: run the test suite on CUDA, then train the bundled
# model. Expects wheels in .whl/ and the corpus in .corpus/ (tools/train_mini.py corpus).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/ 2>&1 | tee "$OUT/tests-cuda.log" | tail -8
python3 tools/train_mini.py train --corpus .corpus --out "$OUT" --batch 64 --steps 12000 --time-budget "${TRAIN_SECONDS:-400}" 2>&1 | tee "$OUT/train.log" | tail -25
