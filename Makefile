# make run   set up, get the data, run the k-NN baseline and evaluate the shipped CNN
# make test  set up, get the data, run the test suite (with the web page's tests in Chromium)
# make app   set up the web page's packages and serve it on http://127.0.0.1:7860
# Both are idempotent: a second run only repeats the work that is not done yet.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_DATA := /usr/share/datasets/fashion-mnist

.PHONY: run test app setup data system-data browser allocator clean

run: setup data
	$(PY) knn.py
	$(PY) test.py best

# Two test processes (TEST_WORKERS=1: one); tests that share a fixture's runs stay in one process.
TEST_WORKERS ?= 2

test: setup data browser $(VENV)/.test-installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

app: setup data $(VENV)/.app-installed
	$(PY) app.py

setup: $(VENV)/.installed allocator

# Packages are installed with uv, pinned, into the virtual environment: it fetches and unpacks them
# in parallel and compiles them to bytecode as pip does, in half pip's time (34 s against 67 s for
# requirements-test.txt, AMD EPYC, 2 cores). Where uv has no wheel for the platform, or fails, pip does it.
UV_VERSION := 0.13.9
install = echo "Installing $(1) into $(VENV)"; \
	  $(PY) -m uv pip install --quiet --compile-bytecode --python $(PY) -r $(1) 2>/dev/null \
	  || { echo "(uv could not: pip installs them)"; $(PY) -m pip install --quiet -r $(1); }

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION) \
	  || echo "No uv for this platform: pip installs the packages (slower)"
	@$(call install,requirements.txt)
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt requirements-app.txt
	@$(call install,requirements-test.txt)
	touch $@

$(VENV)/.app-installed: $(VENV)/.installed requirements-app.txt
	@$(call install,requirements-app.txt)
	touch $@

data: setup system-data
	$(PY) data.py

# How apt-get can be run, in SUDO: as root directly, else with sudo where it needs no password; "no": not at all.
find_sudo = if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=no; fi

# data.py never calls apt: when no copy is found and apt can be used (root, or sudo without a
# password), install Debian/Ubuntu's package of the official files here instead.
system-data:
	@if [ ! -f data/train-images-idx3-ubyte.gz ] && [ ! -d $(SYSTEM_DATA) ] && [ -z "$$FASHION_MNIST_DIR" ] \
	    && command -v apt-get >/dev/null; then \
	  $(find_sudo); \
	  if [ "$$SUDO" != no ]; then \
	    echo "No Fashion-MNIST copy found: installing dataset-fashion-mnist with apt-get"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  fi; \
	fi

# The web page's tests drive Debian's chromium (Playwright cannot download its own browser here):
# installed with apt-get when it is missing and apt can be used, as the data is.
browser:
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
	  $(find_sudo); \
	  if [ "$$SUDO" != no ]; then \
	    echo "No chromium found: installing it with apt-get, for the web page's tests"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; \
	  fi; \
	fi

# train.py runs itself under tcmalloc where it is installed (machine.preload_tcmalloc): CPU training
# 1.7x as fast (NOTEBOOK.md, "Speed"). Installed with apt-get when it is missing and apt can be used, as the data is.
allocator:
	@if ! $(PYTHON) -c "import ctypes.util as u, sys; sys.exit(not u.find_library('tcmalloc_minimal'))" \
	    && command -v apt-get >/dev/null; then \
	  $(find_sudo); \
	  if [ "$$SUDO" != no ]; then \
	    echo "No tcmalloc found: installing libtcmalloc-minimal4 with apt-get, for faster CPU training"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) data __pycache__ tests/__pycache__ .pytest_cache
