# Two commands do all set-up on a fresh machine:
#   make demo   train -> evaluate -> rank -> prune -> retrain -> evaluate on synthetic data
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
# A GPU machine gets the CUDA build of TensorFlow; everything else the CPU one.
REQUIREMENTS := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo requirements-gpu.txt || echo requirements.txt)

.PHONY: setup data demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r $(REQUIREMENTS)
	touch $@

data: setup $(DEMO_DATA)/val.tfrecords

$(DEMO_DATA)/val.tfrecords:
	$(PY) -m dataset.synthetic --out $(DEMO_DATA)

demo: data
	bash demo.sh $(PY)

# TensorFlow turns oneDNN on by default only on some CPUs; the suite runs with
# it off, then the tests that train, rank or prune (and the atrous-conv paths,
# where the two settings differ) run again with it on (docs/atrous.md).
ONEDNN_TESTS := test_atrous test_training test_original_training test_ranking \
	test_criteria test_pruning test_pipeline test_compress test_replicas
test: setup
	TF_ENABLE_ONEDNN_OPTS=0 $(PY) -m pytest -q tests
	TF_ENABLE_ONEDNN_OPTS=1 $(PY) -m pytest -q $(ONEDNN_TESTS:%=tests/%.py)

bench: setup
	$(PY) bench/train_throughput.py --model_def models/small.json
	$(PY) bench/atrous_paths.py
	$(PY) bench/deploy_latency.py --model_def models/small.json --height 64 --width 128

clean:
	rm -rf runs data
