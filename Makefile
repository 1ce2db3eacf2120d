# Quick start: `make demo` (builds and runs the embedded demo) and `make test`.
# Both set up everything they need and are safe to run twice.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loradeploy-installed
RAY_STAMP := $(VENV)/.loradeploy-ray-installed
DEMO_DIR ?= loradeploy-demo
PYTEST_ARGS ?=

.PHONY: setup sysdeps sysdeps-debian sysdeps-macos llama-tools demo test test-fast bench clean-venv

setup: sysdeps $(STAMP) llama-tools

# rsync, ssh and sshd are real components in the fetch stage and its tests; cmake and g++ build llama.cpp.
# Debian/Ubuntu: apt-get. macOS: Xcode's command line tools (the compiler, git) and Homebrew for
# cmake and rsync >= 3 (the system's rsync is 2.6.9, or openrsync from macOS 15.4 on; ssh and sshd ship).
sysdeps:
	@if [ "$$(uname -s)" = Darwin ]; then $(MAKE) --no-print-directory sysdeps-macos; else $(MAKE) --no-print-directory sysdeps-debian; fi

sysdeps-debian:
	@missing=""; \
	command -v rsync >/dev/null || missing="$$missing rsync"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

sysdeps-macos:
	@if ! xcode-select -p >/dev/null 2>&1; then \
	  echo "Xcode's command line tools are missing (the C++ compiler): run 'xcode-select --install', then 'make setup' again" >&2; \
	  exit 1; \
	fi; \
	rsync3() { for r in "$$(command -v rsync)" /opt/homebrew/bin/rsync /usr/local/bin/rsync; do \
	  [ -x "$$r" ] && "$$r" --version 2>/dev/null | head -1 | grep -Eq '^rsync +version v?([3-9]|[1-9][0-9])\.' && return 0; \
	done; return 1; }; \
	missing=""; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	rsync3 || missing="$$missing rsync"; \
	if [ -n "$$missing" ]; then \
	  brew=$$(command -v brew || ls /opt/homebrew/bin/brew /usr/local/bin/brew 2>/dev/null | head -1); \
	  if [ -z "$$brew" ]; then \
	    echo "missing:$$missing (rsync >= 3: macOS's own is 2.6.9 or openrsync). Homebrew is not installed:" \
	         "install it from https://brew.sh and run 'make setup' again, or install$$missing yourself" >&2; \
	    exit 1; \
	  fi; \
	  echo "installing with Homebrew:$$missing"; \
	  "$$brew" install$$missing; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (a plain `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp the first time (about 4 minutes on 2 cores); pip caches the wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# llama.cpp's own tools (llama-server, llama-quantize, llama-imatrix, llama-perplexity) from the llama.cpp
# source in the pinned llama-cpp-python's sdist: built once per version (about 25 minutes on 2 cores) into
# ~/.cache/loradeploy/llama.cpp/, a few seconds when already built. With CUDA where nvcc and an NVIDIA driver
# are found (else the CPU; Metal on macOS); the environment chooses: LORADEPLOY_LLAMA_GPU=auto|cuda|cpu,
# LORADEPLOY_CUDA_ARCHS=90 (default: this machine's GPUs), e.g. `LORADEPLOY_LLAMA_GPU=cpu make setup`
llama-tools: $(STAMP)
	$(PY) -m loradeploy.llamacpp.build --jobs 2

demo: setup
	$(VENV)/bin/loradeploy demo --workdir $(DEMO_DIR)

# Ray, the optional extra behind performance.executor: ray, so its tests run too (about 300 MB, 30 s)
$(RAY_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[ray]'
	touch $(RAY_STAMP)

test: setup $(RAY_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup $(RAY_STAMP)
	$(PY) bench/baseline.py --quick
	$(PY) bench/merge_convert.py
	$(PY) bench/serve.py
	$(PY) bench/adapter_mode.py
	$(PY) bench/cpu_mode.py
	$(PY) bench/scale.py
	$(PY) bench/fetch.py
	$(PY) bench/model_scale.py --size 0.5b

clean-venv:
	rm -rf $(VENV)
