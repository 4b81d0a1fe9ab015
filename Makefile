# Two entry points, each doing its own set-up:
#   make report   analyze the bundled reference model, write spectrakit-report/
#   make test     run the test suite
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: report test bench clean

$(VENV)/.installed-base: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $@

$(VENV)/.installed-dev: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh dev
	touch $@

$(VENV)/.installed-bench: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh "dev,bench"
	touch $@

report: $(VENV)/.installed-base
	$(BIN)/spectrakit analyze --out spectrakit-report

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/spectra.py

clean:
	rm -rf spectrakit-report .pytest_cache
