# vitkit: `make demo` trains a small ViT offline; `make test` runs the suite. Both build .venv from nothing:
# the demo installs what it needs (vitkit and its `train` extra), the suite adds its tooling (the `test` extra:
# transformers, ONNX, OpenVINO, TensorBoard, ...).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
TRAIN := $(VENV)/.installed-train
TEST := $(VENV)/.installed-test

.PHONY: venv demo test test-slow golden bench clean

$(BASE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: otherwise a dependency would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	touch $(BASE)

$(TRAIN): $(BASE)
	$(PY) -m pip install --quiet -e ".[train]"
	touch $(TRAIN)

$(TEST): $(BASE)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST) $(TRAIN)

venv: $(TEST)

demo: $(TRAIN)
	$(VENV)/bin/vitkit demo

# two passes: the suite on two workers (each kept to one core: tests/conftest.py), then the tests timed against the
# wall clock alone (marker `serial`); a failure in the first still runs the second and fails the target
test: $(TEST)
	status=0; \
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not serial" || status=$$?; \
	$(PY) -m pytest -q -m "serial and not slow" || status=$$?; \
	exit $$status

test-slow: $(TEST)
	$(PY) -m pytest -q -m slow

golden: $(TRAIN)
	$(PY) ../shared/golden/check.py ../shared/golden

bench: $(TEST)
	$(VENV)/bin/vitkit bench vit_base_patch16_224 --batch-size 8 --compare transformers

clean:
	rm -rf $(VENV) build *.egg-info
