# Two entry points, each doing its own set-up:
#   make report   analyze the bundled reference model, write spectrakit-report/
#   make test     run the test suite
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: report test bench docs lint clean

$(VENV)/.installed-base: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh dev
	touch $@

$(VENV)/.installed-bench: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh "dev,bench"
	touch $@

$(VENV)/.installed-docs: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh "dev,docs,lint"
	touch $@

report: $(VENV)/.installed-base
	$(BIN)/spectrakit analyze --out spectrakit-report

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

# The site, into site/: runs the tutorials, checks every public name's docstring, fails on a
# broken link or any warning, and renders two pages in headless Chromium when there is one.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(VENV)/.installed-docs
	$(BIN)/ruff check src tests bench scripts docs conftest.py
	$(BIN)/mypy src

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/spectra.py

clean:
	rm -rf spectrakit-report .pytest_cache site docs/tutorials/_output
