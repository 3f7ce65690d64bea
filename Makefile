# fedhive: `make run` sets up and runs the default simulation; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedhive-installed

.PHONY: setup run test lint docs bench clean proto flower-venv vs-flower

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

run: setup
	$(BIN)/fedhive run $(ARGS)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# The documentation site (mkdocs.yml): a warning, such as a broken link, fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build site *.egg-info

# Regenerate the gRPC modules from src/fedhive/transport/proto/fleet.proto.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src --grpc_python_out=src --pyi_out=src \
		src/fedhive/transport/proto/fleet.proto

# Flower for benchmarks/vs_flower.py, in its own venv: flwr 1.42 pins protobuf<7 and
# packaging<26, which conflict with this project's pins.
FLOWER_VENV := .venv-flower

$(FLOWER_VENV)/.installed:
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet "flwr[simulation]==1.42.0"
	touch $@

flower-venv: $(FLOWER_VENV)/.installed

vs-flower: setup flower-venv
	nice -n 10 $(BIN)/python benchmarks/vs_flower.py --flower-python $(FLOWER_VENV)/bin/python
