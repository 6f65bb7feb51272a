# Two commands: `make demo` runs the whole recipe on the bundled sample (CPU, offline);
# `make test` runs the test suite. Both create or reuse .venv from requirements.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/demo.py --output_dir outputs/demo $(ARGS)

test: venv
	$(PY) -m pytest -n 2 tests

clean:
	rm -rf outputs .cache
