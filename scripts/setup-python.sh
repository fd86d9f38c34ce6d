#!/usr/bin/env bash
# Creates .venv: Debian's /usr/bin/python3 (the one with python3-torch 1.13, which scripts the TorchScript
# model) plus pinned PyPI tooling. Idempotent: skipped when the requirements file has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
REQ=tools/requirements.txt
stamp=$VENV/.requirements.sha256
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ -x $VENV/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup-python: .venv up to date"
  exit 0
fi
/usr/bin/python3 -m venv --system-site-packages $VENV
$VENV/bin/python -m pip install -q --disable-pip-version-check -r "$REQ"
$VENV/bin/python -c "import torch, gguf, tokenizers; assert torch.__version__.startswith('1.13'), torch.__version__"
echo "$want" > "$stamp"
echo "setup-python: .venv ready"
