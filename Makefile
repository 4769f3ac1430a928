# mmgpt: every target sets itself up; `make test` and `make demo` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser test demo bench lint clean fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench,onnx]'
	touch $(STAMP)

# The web page's test drives Debian's chromium (playwright never downloads a browser here); without
# root or apt the browser test skips itself with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium not installed; the browser test will skip"

test: venv browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/mmgpt demo --out runs/demo

bench: venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.run

# schemathesis (--checks all) against a live `mmgpt serve` of an untrained tiny model, for FUZZ_SECONDS
# (default 60); fails on any 5xx or response outside the OpenAPI schema (tests/fuzz_server.py says more).
FUZZ_SECONDS ?= 60
fuzz: venv
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python tests/fuzz_server.py --max-time $(FUZZ_SECONDS) $(FUZZ_ARGS)

lint: venv
	$(BIN)/ruff check mmgpt encoders train tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
