# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is only used to export the encoder to ONNX once; pin the CPU build that this machine carries
# (an unpinned torch pulls a multi-GB CUDA build). pyproject.toml keeps a range for users.
TORCH  ?= torch==2.13.0
DEMO_Q ?= Can I get an advance replacement for a faulty TH-50 sensor?

.PHONY: install demo test test-gpu bench-cpu bench-int8 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[cpu,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/trtrag index examples/corpus
	$(BIN)/trtrag ask "$(DEMO_Q)"

test: install
	$(BIN)/python -m pytest -q -rs tests

test-gpu: install
	$(BIN)/python -m pytest -q -m "gpu or tensorrt or tensorrt_llm" tests

bench-cpu: install
	$(BIN)/python benchmarks/cpu_pipeline.py --out bench-cpu.json

# FP32 vs calibrated INT8 on the Debian known-item set (scripts/make_known_items.py --out data/known-items),
# in a workspace that already holds its FP32 index: trtrag index data/known-items/corpus --set workspace=WS
bench-int8: install
	$(BIN)/python benchmarks/int8_engine.py --workspace $(WS) --docs data/known-items/corpus/docs.jsonl \
		--calibration data/known-items/calibration.txt --queries data/known-items/queries.jsonl \
		--out benchmarks/results/int8-engine-cpu.json

clean:
	rm -rf .trtrag .pytest_cache
