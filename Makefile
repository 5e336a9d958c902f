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
# `make serve` first fetches the missing official checkpoints (scripts/fetch_checkpoints.py); FETCH=0 skips that.
FETCH ?= 1
FETCH_STEP := $(if $(filter 0,$(FETCH)),,checkpoints)

# Debian packages of the front-end tests: OHIF runs in Chromium on an Orthanc DICOMweb store; nginx in
# front of app replicas (scripts/replicas.py).
SYSTEM_PACKAGES := chromium orthanc orthanc-dicomweb iproute2 nginx

.PHONY: .venv test serve serve-dicomweb studies checkpoints system-packages clean

.venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off -r requirements.txt
	$(PIP) install --progress-bar off --no-deps $(NODEPS)
	$(PIP) install --progress-bar off --no-deps -e .
	touch $@

test: $(STAMP) system-packages
	$(PY) -m pytest tests -q

# Installed where apt-get can (as root, e.g. CI); elsewhere the OHIF tests skip and say why.
system-packages:
	@if command -v chromium >/dev/null && test -x /usr/sbin/Orthanc && test -x /usr/sbin/nginx && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "note: install $(SYSTEM_PACKAGES) (Debian) for the OHIF end-to-end and replica tests; they are skipped without them"; fi

studies: $(STAMP)
	$(PY) scripts/sample_studies.py $(SAMPLE_STUDIES)

# Downloads and verifies the checkpoints missing from $(APP)/model, or says where to get them; it never
# stops the server's start (offline, or a refused download, it reports and the server starts without them).
checkpoints: $(STAMP)
	$(PY) scripts/fetch_checkpoints.py --model-dir $(APP)/model || \
	  echo "fetch_checkpoints: not every checkpoint could be fetched and verified (see above); the server starts anyway"

serve: $(STAMP) $(FETCH_STEP)
ifeq ($(STUDIES),$(SAMPLE_STUDIES))
	$(PY) scripts/sample_studies.py $(SAMPLE_STUDIES)
endif
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MONAILABEL_PYEXE="$(CURDIR)/$(PY)" \
	  $(VENV)/bin/monailabel start_server --app $(APP) --studies $(STUDIES) \
	  --host $(HOST) --port $(PORT) $(CONF)

# The app on a DICOMweb store: Orthanc on loopback with the synthetic CT series (scripts/dicomweb_store.py).
serve-dicomweb: $(STAMP) $(FETCH_STEP) system-packages
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MONAILABEL_PYEXE="$(CURDIR)/$(PY)" \
	  $(PY) scripts/dicomweb_store.py --work-dir dicomweb-store -- \
	  $(VENV)/bin/monailabel start_server --app $(APP) --studies http://127.0.0.1:8042/dicom-web \
	  --host $(HOST) --port $(PORT) $(CONF)

clean:
	rm -rf $(VENV) $(SAMPLE_STUDIES) dicomweb-store test-artifacts .pytest_cache
