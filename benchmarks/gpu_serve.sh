#!/usr/bin/env bash
# trtrag serve on a GPU under load: a random ~0.7B Llama (our decode loop, continuous batching), a random
# 768-d encoder on torch, the example corpus; 32 chat clients against 1, side by side in one run.
# Usage (on the GPU machine, repository root, python deps importable): bash benchmarks/gpu_serve.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/gpu-serve}; mkdir -p "$out"; work=$(mktemp -d)
python3 - "$work" <<'PY'
import sys; from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_tiny_llama
make_tiny_llama(Path(sys.argv[1]) / "llm", layers=16, hidden=2048)
PY
python3 scripts/make_random_encoder.py --tokenizer-from "$work/llm" --out "$work/enc" --hidden 768 --layers 12 --heads 12
set_=(--set workspace="$work/ws" --set encoder.model="$work/enc" --set serve.access_log=off
      --set "answer.generator={backend: transformers, model: $work/llm}" --set answer.sampling.max_new_tokens=128
      ${EXTRA_SET:-})   # e.g. EXTRA_SET="--set answer.generator.compile=false"
python3 -m trtrag_cli index examples/corpus "${set_[@]}" | tail -2
python3 -m trtrag_cli serve --port 8800 "${set_[@]}" > "$out/serve.log" 2>&1 &
pid=$!
for i in $(seq 1 300); do curl -sf http://127.0.0.1:8800/ready > /dev/null && break; sleep 1; done
python3 -m trtrag_cli bench --serve http://127.0.0.1:8800 --route chat --clients 32 --duration 30 --baseline-s 20 \
    --queries examples/queries.jsonl --out "$out/serve-gpu-chat.json" 2>&1 | tail -12
curl -s http://127.0.0.1:8800/metrics | grep -E "^trtrag_(batch_size|stage_duration_seconds)_(sum|count)" > "$out/metrics.txt" || true
kill -TERM $pid; wait $pid || true
