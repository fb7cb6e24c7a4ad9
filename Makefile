# Two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
# The CPU wheel on a CPU-only machine; on a GPU machine: make TORCH="torch==2.13.0" (CUDA build)
TORCH ?= torch==2.13.0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo demo-local test test-all lint

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	bash scripts/demo.sh

demo-local: install
	$(PYTHON) -m spo_ray train --preset tiny-sd15 run.output_dir=$(CURDIR)/outputs

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

# Also the Ray scenarios marked `extended` (chaos, multi-node rehearsal, SPM jobs, bench smoke):
# ~40 minutes on the 2-core CI machine; run before changing what they cover (docs/testing.md).
test-all: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -m ""

lint:
	$(PYTHON) -m ruff check .
