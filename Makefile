# sam3lora: `make train` and `make test` each set up .venv first when it is missing.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Meta's official SAM 3 package, the oracle of tests/test_oracle_*.py: its wheel's files only, never installed
# (it pins numpy<2, ftfy==6.1.1, ...); the tests import its loss, matcher and eval modules from this folder.
SAM3_ORACLE_VERSION := 0.1.4
SAM3_ORACLE := $(VENV)/oracle/sam3-$(SAM3_ORACLE_VERSION)
ARGS ?=

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install sam3lora (editable) with the dev tools

$(SAM3_ORACLE): | $(STAMP)
	rm -rf $@.tmp && mkdir -p $@.tmp
	$(BIN)/python -m pip download --quiet --no-deps --dest $@.tmp sam3==$(SAM3_ORACLE_VERSION)
	$(BIN)/python -m zipfile -e $@.tmp/sam3-$(SAM3_ORACLE_VERSION)-py3-none-any.whl $@.tmp
	mv $@.tmp $@

oracle: $(SAM3_ORACLE) ## Fetch Meta's sam3 package files for the oracle tests (make test does it)

train: $(STAMP) ## Train the embedded default: tiny SAM 3 on a fresh synthetic set, on CPU (ARGS="..." adds overrides)
	$(BIN)/sam3lora-train experiment=demo $(ARGS)

demo: $(STAMP) ## Serve the Gradio demo on http://127.0.0.1:7860: base vs the newest run's adapter (ARGS="--port 8080 ...")
	$(BIN)/sam3lora-demo $(ARGS)

test: $(STAMP) $(SAM3_ORACLE) ## Run the test suite (offline)
	HF_HUB_OFFLINE=1 SAM3_ORACLE=$(SAM3_ORACLE) $(BIN)/pytest $(ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

clean: ## Remove run outputs, caches and generated data (keeps .venv)
	rm -rf logs data/synthetic .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

distclean: clean ## Also remove .venv
	rm -rf $(VENV)

.PHONY: help install oracle train demo test lint clean distclean
