#!/usr/bin/env bash
# One lent GPU machine, issue 22's runs in steps (each a device call; the machine keeps /tmp between calls
# while it stays warm). Usage from the repository root: bash benchmarks/gpu_session.sh STEP OUTDIR
#   setup     install the carried wheels (.gpu-wheels/) into /tmp/pylib, make the tokenizer, the random 768-d
#             encoder and the 1M x 768 synthetic index under /tmp/w
#   tests     every gpu/tensorrt/tensorrt_llm test at HEAD
#   stage     the retrieval stage as ask/serve run it (hybrid), batch 1 and 32 clients, on the 1M index
#   serve13b  trtrag serve with the 13B-shape generator: continuous vs static batching vs eager transformers
set -euo pipefail
step=$1; out=${2:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH=/tmp/pylib:$PWD TRTRAG_CACHE=/tmp/w/cache HF_HUB_OFFLINE=1
W=/tmp/w
sets=(--set workspace=$W/ws --set encoder.model=$W/enc --set answer.passages=5)
case $step in
  setup)
    [ -d /tmp/pylib ] || pip install -q --no-deps --target /tmp/pylib .gpu-wheels/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
    mkdir -p $W
    python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import make_tiny_llama; make_tiny_llama(Path('$W/llm'))"
    python3 scripts/make_random_encoder.py --tokenizer-from $W/llm --out $W/enc --hidden 768 --layers 12 --heads 12
    python3 benchmarks/synth_index.py --chunks ${CHUNKS:-1000000} "${sets[@]}" --questions $W/q.jsonl | tee "$out/synth.json"
    ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider -m "gpu or tensorrt or tensorrt_llm" tests 2>&1 | tail -30 | tee "$out/gpu-tests.txt"
    ;;
  stage)
    python3 -m trtrag_cli bench --kinds "" --batch 1,32 --clients 32 --reps 50 --queries $W/q.jsonl "${sets[@]}" \
        --out "$out/stage-1m-768.json" 2>&1 | tail -40
    ;;
  serve13b)
    python3 benchmarks/gpu_serve_13b.py "${sets[@]}" --tokenizer $W/llm --questions $W/q.jsonl \
        --out "$out/serve-13b.json" ${SERVE_ARGS:-} 2>&1 | grep -v "^\s*$" | tail -40
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
