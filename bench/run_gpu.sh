#!/usr/bin/env bash
# The GPU benchmarks, on a machine with one H100 and no package registry (the `run` device tool).
#
#   bash bench/run_gpu.sh decode|retrain|all      # carry .whl (ms-swift's wheels + the tokenizer)
#
# ms-swift and what the GPU image lacks travel as py3.12 wheels in .whl/ (download list: bench/README.md);
# they are unpacked with --target into /tmp/swiftpkgs and put on PYTHONPATH, for this process and for
# the training worker that finetune.train starts. Results: bench/out/*.json, copied to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ ! -d /tmp/swiftpkgs/swift ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/swiftpkgs .whl/*.whl
  # pure-Python packages PyPI has only as sources (oss2, aliyun-python-sdk-core, ...), packed from .venv
  if [ -f .whl/extra.tgz ]; then tar xzf .whl/extra.tgz -C /tmp/swiftpkgs; fi
fi
export PYTHONPATH="$PWD:/tmp/swiftpkgs${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# NVLink multicast off, as the lent multi-GPU machines require (also set again for the training launcher)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m bench.gpu_model .cache/bench-qwen7b
case "$what" in
  decode) python3 -m bench.gpu_decode ;;
  retrain) python3 -m bench.gpu_retrain ;;
  all) python3 -m bench.gpu_decode && python3 -m bench.gpu_retrain ;;
  *) python3 -m "bench.$what" "${@:2}" ;;
esac
mkdir -p "${OUT:-bench/out}" && cp bench/out/*.json "${OUT:-bench/out}/" 2>/dev/null || true
