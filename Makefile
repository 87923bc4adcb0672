# Two entry points, both starting from nothing: `make demo` and `make test` (what CI runs: .ci/run).
# Smaller steps: `make lint`, `make typecheck`, `make test-fast` (no Redis, PostgreSQL, CIFAR-10 or browser).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CIFAR10 ?= ../shared/datasets/cifar10-jpg.tar.gz
DEMO ?= runs/demo

.PHONY: setup demo test test-fast lint typecheck format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the release CI has on disk (any torch>=2.10 works). --no-compile:
	# byte-compiling all of torch took half the install; Python compiles what a command imports, when it does.
	$(BIN)/pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-compile -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

# Train a small backdoored CNN on real CIFAR-10, then purify it and print ACC/ASR before and after.
demo: setup
	mkdir -p $(DEMO)
	$(BIN)/clipguard train --arch small_cnn --data '$(CIFAR10)#train' --limit 5000 --epochs 6 --no-augment \
		--attack badnets:pattern=checkerboard --poison-rate 0.05 --lr 0.05 --batch-size 128 \
		--out $(DEMO)/victim.safetensors --save-data $(DEMO)/poisoned-train.npz --quiet > $(DEMO).train.json
	$(BIN)/clipguard purify --arch small_cnn --weights $(DEMO)/victim.safetensors \
		--data $(DEMO)/poisoned-train.npz --eval-data '$(CIFAR10)#test' --no-sweep \
		--attack $(DEMO)/victim.safetensors.attack.json --out $(DEMO)/purified --overwrite

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: setup
	$(BIN)/mypy

# Markers are applied in tests/conftest.py.
test-fast: setup
	$(BIN)/pytest -q -m "not service and not browser and not cifar and not slow"

test: lint typecheck
	$(BIN)/pytest -q --durations=10

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
