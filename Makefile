# Every target installs on demand: a fresh clone needs nothing but python3 (>= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

test-slow: $(STAMP)
	$(BIN)/pytest -m slow || [ $$? -eq 5 ]  # exit 5 = no test selected

demo: $(STAMP)
	$(BIN)/cfm-jax sweep quickstart --scale smoke --workers 2 --retrain
	$(BIN)/cfm-jax report quickstart --scale smoke

bench: $(STAMP)
	$(BIN)/cfm-jax bench --scale smoke

clean:
	rm -rf $(VENV) runs .pytest_cache
