# Two commands on a fresh machine: `make demo` and `make test`.
# Each has its own install stamp: the demo needs only the `cpu` extra (and the CPU torch that exports the
# encoder once); the tests add the `dev` extra (pytest, triton, sentence-transformers, matplotlib, ...)
# and `rtx` (TensorRT-RTX, so CI builds a real TensorRT plan ahead of time on its CPU).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is only used to export the encoder to ONNX once; pin the CPU build that this machine carries
# (an unpinned torch pulls a multi-GB CUDA build). pyproject.toml keeps a range for users.
TORCH  ?= torch==2.13.0
DEMO_Q ?= Can I get an advance replacement for a faulty TH-50 sensor?

.PHONY: install demo test test-gpu bench bench-gpu bench-cpu bench-int8 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[cpu]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[cpu,dev,rtx]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(BIN)/trtrag index examples/corpus
	$(BIN)/trtrag ask "$(DEMO_Q)"

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -rs tests

test-gpu: install
	$(BIN)/python -m pytest -q -m "gpu or tensorrt or tensorrt_llm" tests

# `trtrag bench` on synthetic clustered vectors: CPU-sized here, the issue's 1M x 768 on a GPU machine.
bench: install
	$(BIN)/trtrag bench --vectors 100000 --dim 384 --out bench.json --plot bench.png

# MODEL768: a 768-d sentence-transformers folder (scripts/make_random_encoder.py writes one for timing).
bench-gpu: install
	$(BIN)/trtrag bench --vectors 1000000 --dim 768 --batch 1,32,1000 --kinds ivf,ivfpq \
		--set index.nprobe=32 --set encoder.precision=fp16 --set encoder.model=$(MODEL768) --out bench-gpu.json

bench-cpu: install
	$(BIN)/python benchmarks/cpu_pipeline.py --out bench-cpu.json

# FP32 vs calibrated INT8 on the Debian known-item set (scripts/make_known_items.py --out data/known-items),
# in a workspace that already holds its FP32 index: trtrag index data/known-items/corpus --set workspace=WS
bench-int8: install
	$(BIN)/python benchmarks/int8_engine.py --workspace $(WS) --docs data/known-items/corpus/docs.jsonl \
		--calibration data/known-items/calibration.txt --queries data/known-items/queries.jsonl \
		--out bench-int8.json

clean:
	rm -rf .trtrag .pytest_cache
