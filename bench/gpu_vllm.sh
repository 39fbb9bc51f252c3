#!/usr/bin/env bash
# vLLM 0.25's CUDA build on the GPU machine (../shared/tools/vllm_gpu_bundle.sh .vllm-gpu here
# first). The bundle travels in three calls (64 MiB per call), each carrying one piece:
#
#   bash bench/gpu_vllm.sh 1        carry [".vllm-gpu/1"]
#   bash bench/gpu_vllm.sh 2        carry [".vllm-gpu/2"]     (within 30 s: /tmp survives
#   bash bench/gpu_vllm.sh 3        carry [".vllm-gpu/3"]      while the machine stays warm)
#
# Piece 3 also installs vLLM into /tmp/vsite. Every later call, sourced:
#
#   source bench/gpu_vllm.sh env    (fails fast when the machine lost /tmp)
#
# installs fl-dispatch from this tree into /tmp/flsite (no FlagGems: the flagos rows are our
# own kernels; FlagGems' aten registration would replace torch's matmuls model-wide) and exports
# PYTHONPATH for vLLM, which finds fl-dispatch's entry points there.
case "$1" in
  1|2|3)
    mkdir -p /tmp/stage && cp ".vllm-gpu/$1"/* /tmp/stage/ || exit 1
    echo "piece $1 staged: $(ls /tmp/stage | wc -l) files in /tmp/stage"
    if [ "$1" = 3 ]; then
      bash /tmp/stage/install.sh /tmp/vsite >/tmp/vsite-install.log 2>&1 \
        || { tail -20 /tmp/vsite-install.log; exit 1; }
      echo "vLLM installed in /tmp/vsite"
    fi ;;
  env)
    if [ ! -d /tmp/vsite/vllm ]; then
      echo "no /tmp/vsite: the machine was given back; stage the three pieces again" >&2
      return 3 2>/dev/null || exit 3
    fi
    rm -rf /tmp/flsite
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/flsite . \
      >/dev/null || { return 1 2>/dev/null || exit 1; }
    export PYTHONPATH=/tmp/vsite:/tmp/flsite VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
    python3 -c "import vllm, fl_dispatch; print('vllm', vllm.__version__, 'fl_dispatch', fl_dispatch.__version__)" ;;
  *) echo "usage: bash bench/gpu_vllm.sh 1|2|3, or source bench/gpu_vllm.sh env" >&2; exit 2 ;;
esac
