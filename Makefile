# Quick start: `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test test-fast bench sweep-small gpu-check clean

setup: $(STAMP)

# Rebuilt only when the pins or the set-up script change: a second
# `make setup` is a no-op.
$(STAMP): pyproject.toml tools/setup_env.py
	$(PYTHON) tools/setup_env.py $(VENV)
	touch $(STAMP)

# The whole pipeline (configs/pipelines/demo.yaml) through torchx on this machine, from
# scratch each time: generate -> preprocess -> train on 2 ranks -> collapse report -> export.
demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pipelines.run --config configs/pipelines/demo.yaml --from generate

# pytest exits 5 when it collected no tests: that is a failure, not green.
test: setup
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# The developer's loop: everything but the tests marked slow (end-to-end runs), about 30 s.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: no tests were collected" >&2; exit 1; fi; exit $$rc

bench: setup
	$(PY) -m bench

# The paper's scaling sweep in miniature (configs/sweeps/small.yaml): synthetic data, seven
# models x SE/ME x 1/2/4x; report in runs/sweep_small/table.md. Rerun it to resume.
sweep-small: setup
	test -e runs/sweep_small/dataset/schema.json || $(PY) -m trainer.data.synthetic --rows 20000 \
		--cardinality-scale 0.002 --format parquet --output runs/sweep_small/dataset
	$(PY) -m pipelines.sweep --spec configs/sweeps/small.yaml

# One CUDA GPU, no network, under 5 minutes: driver, torch/fbgemm/torchrec, then short fused-Adam
# runs (row-wise, table-wise, UVM caching), a resume, an export and its parity (tools/gpu_check.py).
# The .venv python by default; in a CUDA image with its own torch:
#   make gpu-check PYTHON=python3 WHEELS=/path/to/wheels   (fbgemm-gpu, torchrec installed from there)
# Exit 2 (and nothing run) where there is no GPU.
GPU_CHECK_PY = $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),$(PY))
gpu-check:
	@command -v $(GPU_CHECK_PY) >/dev/null || { echo "make gpu-check: no $(GPU_CHECK_PY) (make setup, or PYTHON=...)" >&2; exit 2; }
	$(GPU_CHECK_PY) tools/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
