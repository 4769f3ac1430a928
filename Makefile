# mmgpt: every target sets itself up; `make test` and `make demo` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/mmgpt demo --out runs/demo

bench: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run

lint: venv
	$(BIN)/ruff check mmgpt encoders train tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
