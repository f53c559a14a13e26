# openrlhf-dual: two commands. `make test` and `make demo` set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.openrlhf-dual-installed
DEMO_OUT ?= demo_out
# CPU build of torch (lies on disk on these machines); on a CUDA machine the default build is used.
TORCH_CPU ?= torch==2.13.0
FLASH_ATTN ?= flash-attn==2.8.3
OPENRLHF ?= openrlhf==0.11.2

.PHONY: install test demo demo-pecan bench evidence mutation clean

install: $(STAMP)
	@$(PY) patches/apply.py

# Order matters on a fresh machine: torch first (else a multi-GB CUDA torch is pulled in), then
# flash-attn (its setup.py imports torch, hence --no-build-isolation; without CUDA only its Python
# files install), then OpenRLHF and the rest, then our patches, then this package.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q setuptools wheel packaging psutil ninja numpy
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch and building the real flash-attn"; \
		$(PIP) install -q torch && $(PIP) install -q --no-build-isolation $(FLASH_ATTN); \
	else \
		echo "no CUDA: CPU torch, flash-attn Python files only (CUDA build skipped)"; \
		$(PIP) install -q $(TORCH_CPU) && \
		FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
			$(PIP) install -q --no-build-isolation $(FLASH_ATTN); \
	fi
	$(PIP) install -q --no-build-isolation $(OPENRLHF)
	$(PY) patches/apply.py
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	$(PY) -m openrlhf_dual.demo --out $(DEMO_OUT)

demo-pecan: install
	$(PY) -m openrlhf_dual.demo --algo pecan --out $(DEMO_OUT)-pecan

bench: install
	$(PY) benchmarks/dual_solver.py
	$(PY) benchmarks/logprob.py

# README's "Does it work?" section and docs/evidence/*.png, from fresh runs (about 30 minutes)
evidence: install
	$(PY) benchmarks/evidence.py --out evidence_out

# Mutation testing of the pure layers with their fast tests (mutation/run.py; not part of `make test`
# or CI): writes mutation/summary.json; survivors must be killed or explained in mutation/EQUIVALENT.md
mutation: install
	$(PIP) install -q mutmut==3.8.1
	$(PY) mutation/run.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_OUT)-pecan evidence_out .pytest_cache mutants
