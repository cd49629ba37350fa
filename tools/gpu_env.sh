# Sourced by tools/gpu_ffn.sh, gpu_decode_options.sh and gpu_candidates.sh on a device-tool machine
# (carrying .whl): installs the carried wheels into /tmp/site (exits the script if that fails),
# puts them and src/ on PYTHONPATH, prints the GPU and sets $card (h200, h100, ...; "gpu" if unknown).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|l40s|[0-9]{4}' | head -1 | tr A-Z a-z)
card=${card:-gpu}
