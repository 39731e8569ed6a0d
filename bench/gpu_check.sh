#!/usr/bin/env bash
# One GPU check, for a machine with a CUDA GPU, Python 3.12 and PyTorch but no network (the
# H200 lent through the device tool): installs the carried wheels, runs the GPU tests, then the
# side-by-side benchmark (ours in float32 and bf16 autocast, the reference e2e-sae 2.1.1 in
# float32) on the GPT-2-small shape, then ours with torch.compile. About 6 minutes on one H200.
#
#   bench/fetch_gpu_wheels.sh          # here, with pip access: fills .whl/{common,ours,ref}
#   OUT=/some/dir bench/gpu_check.sh   # there: results under $OUT (default bench/results/gpu)
#
# Writes: gpu_tests.log, gpt2-small-gpu.jsonl (one JSON line per case, then the ratios),
# bench.log, env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

install() {  # install() TARGET WHEEL_DIRS...: a private site folder, the image's packages untouched
  local target=$1
  shift
  local wheels=()
  for dir in "$@"; do wheels+=("$dir"/*.whl); done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "${wheels[@]}"
}
install /tmp/sparsify_site .whl/common .whl/ours || exit 1
install /tmp/reference_site .whl/common .whl/ref || exit 1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  $PY -c "import triton; print('triton', triton.__version__)" || echo "no triton: compile: true cannot run on this GPU"
} 2>&1 | tee "$OUT/env.txt"

echo "== GPU tests"
PYTHONPATH=/tmp/sparsify_site:. timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider tests/sparsify/test_gpu.py 2>&1 |
  tee "$OUT/gpu_tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}

echo "== benchmark (ours eager and torch.compile'd, the reference; warmup absorbs the compile)"
timeout 390 $PY -m bench.run --case gpt2-small-gpu --precision bf16-autocast float32 --warmup 3 --steps 8 \
  --compile-precision bf16-autocast --ours-pythonpath /tmp/sparsify_site --ref-pythonpath /tmp/reference_site --timeout 125 --out "$OUT" 2>&1 |
  grep -v -i "warn" | tee "$OUT/bench.log" | tail -n 30
bench_rc=${PIPESTATUS[0]}

echo "== ablation: e2e without resuming at the SAE's block"
PYTHONPATH=/tmp/sparsify_site:. timeout 60 $PY -m bench.ours --case gpt2-small-gpu --arms e2e \
  --precision bf16-autocast --no-resume --warmup 2 --steps 8 --out "$OUT/gpt2-small-gpu.jsonl" 2>&1 | grep '^{'

echo "gpu tests exit $tests_rc, benchmark exit $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
