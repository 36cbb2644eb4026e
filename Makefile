# The README's two commands. Everything runs in a local virtual environment (.venv) built from
# constraints.txt, so a fresh clone on a fresh machine needs only Python 3.10+ and make.
#   make demo   install, then train the SSD on the embedded dataset and print COCO metrics
#   make test   install, then run the test suite (CI runs exactly this: .ci/run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench stats clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -c constraints.txt -e ".[dev,export,bench]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/mnapps train-det --head ssd

test: install
	$(PY) -m pytest -q

stats: install
	$(PY) tools/model_stats.py

bench: install
	$(PY) tools/benchmark.py

clean:
	rm -rf $(VENV) runs .pytest_cache
