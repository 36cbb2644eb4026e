# Everything runs in a local virtual environment (.venv) built from constraints.txt.
#   make demo   install, then train the SSD on the embedded dataset and print COCO metrics
#   make test   install, then run the test suite
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
	$(PY) tools/train_det.py --head ssd

test: install
	$(PY) -m pytest -q

stats: install
	$(PY) tools/model_stats.py

bench: install
	$(PY) tools/benchmark.py

clean:
	rm -rf $(VENV) runs .pytest_cache
