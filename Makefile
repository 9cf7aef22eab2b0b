# vitkit: `make demo` trains a small ViT offline; `make test` runs the suite. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow golden bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: otherwise a dependency would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitkit demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

golden: $(STAMP)
	$(PY) ../shared/golden/check.py ../shared/golden

bench: $(STAMP)
	$(VENV)/bin/vitkit bench vit_base_patch16_224 --batch-size 8 --compare transformers

clean:
	rm -rf $(VENV) build *.egg-info
