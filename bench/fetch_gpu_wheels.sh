#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on an offline GPU machine (Python 3.12,
# x86-64, with PyTorch, transformers 5, numpy, pyarrow, tokenizers already there) into .whl/.
#   common: pydantic and friends (both implementations)
#   ours:   transformer-lens 4 and datasets
#   ref:    e2e-sae 2.1.1 with transformer-lens 2 and the transformers 4 / hub / tokenizers it needs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
download() {
  local dir=$1
  shift
  mkdir -p "$dir"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" "$@"
}
download .whl/common pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  fancy-einsum==0.0.3 typeguard==4.6.1
download .whl/ours transformer-lens==4.3.0 beartype==0.23.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
download .whl/ref e2e-sae==2.1.1 transformer-lens==2.18.0 transformers==4.57.6 huggingface-hub==0.36.2 \
  tokenizers==0.22.2 beartype==0.14.1 better-abc==0.0.3 datasets==3.6.0 dill==0.3.8 multiprocess==0.70.16 \
  python-dotenv==1.2.4
du -sh .whl
