#!/usr/bin/env bash
# Stage the GPU machine for the benches (run from the repository root there, sourced):
#   source bench/gpu_stage.sh
# Installs fl-dispatch from this tree into /tmp/flsite (every call: the tree changes between
# calls) and, once per warm machine, FlagGems from .whl/ (../shared/tools/gpu_wheels.py -d .whl
# flag-gems==5.0.2) into /tmp/site. vLLM's compiled ops (.gpu-ops/*.xz, ../shared/tools/
# vllm_cuda_ops.sh) and FlashMLA / TRITON_MLA (.gpu-mla/) are found by the benches themselves.
# Carry what a bench needs: `.whl`, `.gpu-ops/vllm_moe_C.so.xz`, `.gpu-mla`.
if [ -d .whl ] && [ ! -f /tmp/site/.fl_staged ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && touch /tmp/site/.fl_staged
fi
rm -rf /tmp/flsite
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/flsite . >/dev/null
export PYTHONPATH=/tmp/site:/tmp/flsite${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
