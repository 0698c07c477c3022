# The two commands of the README: `make run` (set up, start the server) and `make test`
# (set up, run every test). Everything installs into .venv from the package registry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The package's modules: a strict editable install links each file, so adding one reinstalls.
MODULES := $(VENV)/.modules
PACKAGE_FILES := $(sort $(wildcard client/*.py client/py.typed engine/*.py engine/ops/*.py \
	server/*.py proto/graphgrad/v1/*.py proto/graphgrad/v1/*.pyi proto/graphgrad/v1/*.proto))

.PHONY: FORCE setup run demo test smoke lint typecheck proto buflint bench clean

# Strict editable mode lays the package out as installed (build/__editable__.*/graphgrad,
# links to the sources), so mypy and every tool find `graphgrad` as they would a wheel.
$(STAMP): pyproject.toml $(MODULES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,plot]" --config-settings editable_mode=strict
	touch $(STAMP)

# Rewritten only when the list of package files changes.
$(MODULES): FORCE
	@mkdir -p $(VENV)
	@echo "$(PACKAGE_FILES)" | cmp -s - $@ || echo "$(PACKAGE_FILES)" > $@

FORCE:

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

# mypy finds the installed package (the strict editable install's layout), as users' tools do.
typecheck: setup
	$(BIN)/mypy -p graphgrad

proto: setup
	$(BIN)/python proto/generate.py

# buf's linter for the contract (the buf CLI comes from the npm registry).
buflint:
	cd proto && npx --yes @bufbuild/buf lint

bench: setup
	$(BIN)/python bench/remote_latency.py
	$(BIN)/python bench/server_kinds.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/run_path.py
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
