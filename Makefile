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
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/triform train --preset shakespeare --time-budget 4m --out runs/shakespeare
	@echo "checkpoint and loss plot are in runs/shakespeare/; try:"
	@echo "  $(BIN)/triform generate runs/shakespeare \"ROMEO:\" --max-new-tokens 300"

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/shakespeare.py --data ../shared/data/tinyshakespeare.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
