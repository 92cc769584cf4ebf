# make demo  - create .venv, install stune + plugins, train a LoRA on a tiny generated FLUX model (CPU, minutes)
# make test  - install test tools into the same .venv; lint, type-check and run the whole suite
# make bench - benchmarks that print tables (speed is measured here, never asserted in tests)

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.stune-installed
TEST_TOOLS := $(VENV)/.stune-test-tools
PLUGINS := plugins/flux plugins/sd3 plugins/hidream plugins/tread plugins/rollout plugins/web
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test lint typecheck pytest bench clean

$(PY):
	python3 -m venv $(VENV)

# torch first, chosen for the machine: a plain `torch` requirement on a machine without it would
# pull a multi-GB CUDA build. Without a GPU we take the CPU build (on this machine's disk).
$(INSTALLED): $(PY) core/pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS)) plugins/quant/pyproject.toml plugins/publish/pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install -q torch; \
	else \
		$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -e 'core[parquet,trackers]' $(addprefix -e ,$(PLUGINS)) -e 'plugins/quant[all]' -e 'plugins/publish[all]'
	# optimum-quanto compiles its C++ extension (int4/int2) on first use: once here, not in every test
	$(PY) -m stune_quant.warmup
	@touch $@

# Browser tests (report.html, the web interface) drive Debian's chromium through selenium; where
# apt is not available they are skipped with that reason.
$(TEST_TOOLS): $(INSTALLED)
	$(PIP) install -q "pytest>=8" "ruff>=0.6" "mypy>=1.11" "selenium>=4.20" "hypothesis>=6.100" "moto[server]>=5"
	@if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
			|| echo "could not install chromium: the browser tests will be skipped"; \
	fi
	@touch $@

demo: $(INSTALLED)
	$(VENV)/bin/st-train demo --dir demo

lint: $(TEST_TOOLS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(TEST_TOOLS)
	$(VENV)/bin/mypy

pytest: $(TEST_TOOLS)
	$(VENV)/bin/pytest

test: lint typecheck pytest

bench: $(INSTALLED)
	$(PY) bench/step_overhead.py
	$(PY) bench/data_pipeline.py
	$(PY) bench/optimizers.py
	$(PY) bench/tread.py
	$(PY) bench/rollout.py
	$(PY) bench/quantization.py
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) demo
