#!/usr/bin/env bash
# On a GPU machine of the device tool (carry .whl): everything behind the published GPU figures,
# in one call of at most about 9.5 minutes:
#   1. the whole test suite on CUDA with per-test results (-rA), first so that it always comes back
#   2. decode against the official rwkv package, batch 1, ours with and without CUDA graphs
#   3. the impact table (docs/impact.md)
#   4. the state benchmark (docs/benchmarks/state-h200.*)
# Each stage gets at most what is left of BUDGET_S (default 570 s). SHAPES (default 0.1B,1.5B)
# picks the shapes of 2 and 3; SHAPES=7.2B STAGES=decode,impact is the
# second call for the largest shape (merge its impact JSON with `rwkvstate bench impact --merge`).
# COMMIT=<sha> names the commit the working tree is at (the device copy carries no .git); the log
# also records a digest of every tracked source file, which `tools/gpu_honest.sh digest` prints
# here for comparison. Everything lands in $OUT/$PART.tgz; $OUT/$PART-summary.txt is its short log
# (PART, default honest, lets two calls run side by side, e.g. on the two GPUs of nvidia-h200-x2:
# `tools/gpu_honest.sh split` runs the tests on GPU 0 and the benchmarks on GPU 1, each on its own
# half of the CPU cores).
set -o pipefail
digest() { find src tests benchmarks tools -type f \( -name '*.py' -o -name '*.sh' \) | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }
if [ "${1:-}" = digest ]; then digest; exit; fi
[ -n "${INSTALLED:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export INSTALLED=1
if [ "${1:-}" = split ]; then
  half=$(( $(nproc) / 2 ))
  CUDA_VISIBLE_DEVICES=0 PART=tests STAGES=tests OMP_NUM_THREADS=4 taskset -c 0-$((half - 1)) bash "$0" &
  CUDA_VISIBLE_DEVICES=1 PART=bench STAGES=${BENCH_STAGES:-decode,impact,state} taskset -c $half-$(( $(nproc) - 1 )) bash "$0" &
  wait; exit
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
PART=${PART:-honest}; R=/tmp/$PART; rm -rf "$R"; mkdir -p "$R"
SHAPES=${SHAPES:-0.1B,1.5B}; STAGES=${STAGES:-tests,decode,impact,state}
tag=$(echo "$SHAPES" | tr ',.' '-_')
log() { echo "$*" | tee -a "$OUT/$PART-summary.txt"; }
pack() { tar -czf "$OUT/$PART.tgz" -C /tmp "$PART"; }  # after every stage: a cut-off call keeps what ran
stage() { case ",$STAGES," in *",$1,"*) return 0 ;; esac; return 1; }
start=$SECONDS
budget() { local left=$((${BUDGET_S:-570} - (SECONDS - start))); echo $((left < $1 ? (left > 10 ? left : 10) : $1)); }
log "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo 'not given (set COMMIT=<sha>)')}"
log "source digest: $(digest)"
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
log "$(python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
if stage tests; then  # first, so the suite at this commit always comes back
  { echo "commit: ${COMMIT:-unknown}; source digest: $(digest); $(nvidia-smi --query-gpu=name --format=csv,noheader)"
    timeout "$(budget ${TESTS_S:-300})" python3 -m pytest -rA -p no:cacheprovider tests/ 2>&1; } > "$R/tests-cuda-h200.log"
  log "tests: rc $? after $((SECONDS - start)) s"; tail -3 "$R/tests-cuda-h200.log" | tee -a "$OUT/$PART-summary.txt"; pack
fi
if stage decode; then
  timeout "$(budget 150)" python3 benchmarks/bench_decode.py --official --variants default --batches 1 \
    --prefill-batches "" --shapes "$SHAPES" --steps 20 --repeats 3 --workdir /tmp --out "$R/decode-official-$tag" \
    > "$R/decode-$tag.log" 2>&1
  log "decode: rc $? after $((SECONDS - start)) s"
  grep -A8 "^## Against" "$R/decode-official-$tag.md" 2>/dev/null | tee -a "$OUT/$PART-summary.txt"; pack
fi
if stage impact; then
  timeout "$(budget ${IMPACT_S:-150})" python3 -m rwkvstate.cli bench impact --shapes "$SHAPES" --out "$R/impact-$tag" \
    --doc "$R/impact-$tag.md" > "$R/impact-$tag.log" 2>&1
  log "impact: rc $? after $((SECONDS - start)) s; $(grep -o 'unstable' "$R/impact-$tag.md" 2>/dev/null | wc -l) unstable marks"
  pack
fi
if stage state; then
  timeout "$(budget 90)" python3 benchmarks/bench_state.py --out "$R/state-h200" > "$R/state.log" 2>&1
  log "state: rc $? after $((SECONDS - start)) s"; pack
fi
log "done after $((SECONDS - start)) s"
