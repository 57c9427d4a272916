# Two commands do all set-up on a fresh machine:
#   make demo   train -> evaluate -> rank -> prune -> retrain -> evaluate on synthetic data
#   make test   the test suite (make test-fast: without the slowest group)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
# A GPU machine gets the CUDA build of TensorFlow; everything else the CPU one.
REQUIREMENTS := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo requirements-gpu.txt || echo requirements.txt)

.PHONY: setup data demo test test-fast test-long bench clean

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
# it off, then the tests whose results can differ between the settings (marked
# onednn: atrous kernels, a training step, a rank pass, the replica layer) run
# again with it on (docs/atrous.md). Two worker processes, one test file each
# (three were slower on 2 cores: 18.5 against 16.8 minutes, docs/testing.md).
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile
test: setup
	TF_ENABLE_ONEDNN_OPTS=0 $(PYTEST) --durations=15 -m "not long" tests
	TF_ENABLE_ONEDNN_OPTS=1 $(PYTEST) --durations=15 -m "onednn and not long" tests

# What make test leaves out for time (pytest.ini, marker long).
test-long: setup
	TF_ENABLE_ONEDNN_OPTS=0 $(PYTEST) -m long tests

# The edit loop: everything but the slowest group, oneDNN off.
test-fast: setup
	TF_ENABLE_ONEDNN_OPTS=0 $(PYTEST) -m "not slow and not long" tests

bench: setup
	$(PY) bench/train_throughput.py --model_def models/small.json
	$(PY) bench/atrous_paths.py
	$(PY) bench/deploy_latency.py --model_def models/small.json --height 64 --width 128

clean:
	rm -rf runs data
