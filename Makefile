# Two commands do everything on a fresh clone:
#   make run   - create .venv, install, run the whole DVC pipeline on the embedded synthetic data
#   make test  - create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: setup run test test-all ui bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "installing stm-defects and its pinned dependencies into $(VENV) (about 3-4 minutes)..."
	$(BIN)/pip install -c constraints.txt -e '.[dev]' > $(VENV)/install.log 2>&1 \
	  || { grep -v "is ignored" $(VENV)/install.log | tail -40; exit 1; }
	$(BIN)/python -c "import stm_defects, torch; print('installed stm-defects with torch', torch.__version__)"
	touch $(STAMP)

run: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH STM_PIPELINE_RUN=make-run-$$(date +%Y%m%d-%H%M%S)-$$($(BIN)/python -c 'import uuid; print(uuid.uuid4().hex)') $(BIN)/dvc repro
	@PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/stm results

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

ui: $(STAMP)
	$(BIN)/stm ui

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_predict.py

clean:
	rm -rf $(VENV)
