# The two commands of the README: `make run` (set up, start the server) and `make test`
# (set up, run every test). Everything installs into .venv from the package registry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test smoke lint typecheck proto buflint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,plot]"
	touch $(STAMP)

setup: $(STAMP)

# The main job: the graphgrad server on 127.0.0.1:50051, with an embedded local Ray.
run: setup
	$(BIN)/graphgrad serve

demo: setup
	$(BIN)/python examples/seed_demo.py

# pytest exit code 5 means no test ran: that must fail, not pass silently.
test: setup lint typecheck
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

smoke: setup
	$(BIN)/pytest -q -m "not slow" tests/test_ir.py tests/test_ops.py tests/test_seed.py

# The layer contract of ../shared/DESIGN.md over the import graph (and the imports' cost:
# the engine loads no gRPC or protobuf); it runs in `make test` too.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layers.py

# mypy resolves modules from directories, so it checks a tree of links laid out as installed.
typecheck: setup
	rm -rf build/typecheck && mkdir -p build/typecheck/graphgrad
	for f in client/*; do ln -s ../../../$$f build/typecheck/graphgrad/; done
	ln -s ../../../engine build/typecheck/graphgrad/engine
	ln -s ../../../server build/typecheck/graphgrad/server
	ln -s ../../../proto/graphgrad/v1 build/typecheck/graphgrad/v1
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p graphgrad

proto: setup
	$(BIN)/python proto/generate.py

# buf's linter for the contract (the buf CLI comes from the npm registry).
buflint:
	cd proto && npx --yes @bufbuild/buf lint

bench: setup
	$(BIN)/python bench/remote_latency.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/blas_share.py
	$(BIN)/python bench/observability.py
	$(BIN)/python bench/bigdag.py
	$(BIN)/python bench/wide.py
	$(BIN)/python bench/seednet.py
	$(BIN)/python bench/planning.py
	$(BIN)/python bench/soak.py
	$(BIN)/python bench/imports.py

clean:
	rm -rf $(VENV) build *.egg-info
