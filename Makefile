# Set-up and entry points. `make serve` and `make test` create the venv themselves.
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.samlabel-installed

# Installed with --no-deps: their declared dependencies pull CUDA torch, sam2 and
# torchvision (see requirements.txt); what they need is in requirements.txt.
NODEPS := monailabel==0.8.5 pydicom-seg==0.4.1

APP ?= apps/fastsam3d
SAMPLE_STUDIES := sample-studies
# A studies folder or a DICOMweb URL; the sample studies are written only for the default.
STUDIES ?= $(SAMPLE_STUDIES)
HOST ?= 127.0.0.1
PORT ?= 8000
# Extra server options, e.g. make serve CONF="--conf models fastsam3d"
CONF ?=

.PHONY: .venv test serve studies clean

.venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off -r requirements.txt
	$(PIP) install --progress-bar off --no-deps $(NODEPS)
	$(PIP) install --progress-bar off --no-deps -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests -q

studies: $(STAMP)
	$(PY) scripts/sample_studies.py $(SAMPLE_STUDIES)

serve: $(STAMP)
ifeq ($(STUDIES),$(SAMPLE_STUDIES))
	$(PY) scripts/sample_studies.py $(SAMPLE_STUDIES)
endif
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MONAILABEL_PYEXE="$(CURDIR)/$(PY)" \
	  $(VENV)/bin/monailabel start_server --app $(APP) --studies $(STUDIES) \
	  --host $(HOST) --port $(PORT) $(CONF)

clean:
	rm -rf $(VENV) $(SAMPLE_STUDIES) .pytest_cache
