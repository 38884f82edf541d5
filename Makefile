# Everything runs inside .venv. torch is installed first at a pinned release: on machines whose pip index has
# the CPU wheel locally this avoids pulling a multi-GB CUDA build for a looser requirement.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: install install-test all test verify bench docker-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[cpu]"

install-test: install
	$(BIN)/pip install -e ".[cpu,test]"

all: install
	$(BIN)/pipeline all $(ARGS)

test: install-test
	$(BIN)/python -m pytest -q

# Every backend x precision of the run made by `make all` against the PyTorch FP32 reference; exit 1 when a gate
# fails. REQUIRE=trt makes missing TensorRT a failure (on the target device).
REQUIRE ?=
verify: install
	$(BIN)/pipeline verify $(if $(REQUIRE),--require $(REQUIRE)) $(ARGS)

bench: install
	$(BIN)/python benchmarks/bench.py --out bench.json

# The cpu image, built and used as the README says (PASS/FAIL per check, image size, build and run times; .ci/docker-test
# says how). DOCKER_TEST_ARGS=--from-debian: as root, bring up the engine and a stand-in base from Debian packages.
DOCKER_TEST_ARGS ?=
docker-test:
	$(PYTHON) .ci/docker-test $(DOCKER_TEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
