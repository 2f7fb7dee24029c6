# Two entry points: `make demo` and `make test`. Both create the virtual environment and build
# the patched llama.cpp once; later runs reuse them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)
# extra CMake switches, e.g. CMAKE_ARGS="-DGGML_CUDA=ON"
CMAKE_ARGS ?=

DEPS_STAMP := $(VENV)/.rkv-deps
LIB        := rkv_local/lib/libllama.so
NATIVE_SRC := $(wildcard native/*) $(wildcard patches/*.patch) CMakeLists.txt

.PHONY: all venv build demo test clean

all: build

venv: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the bindings only: llama.cpp itself is built below, from the same release's source
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(BIN)/python -m pip install -q "llama-cpp-python==0.3.36"
	# pyproject.toml's dependencies and its test and server extras, plus the build tools
	$(BIN)/python -m pip install -q numpy gguf matplotlib tqdm pytest openai cmake ninja \
		"uvicorn>=0.22.0" "fastapi>=0.100.0" "pydantic-settings>=2.0.1" "sse-starlette>=1.6.1" \
		"starlette-context>=0.3.6,<0.4" "PyYAML>=5.1"
	# the source folder is the package: no reinstall after each edit
	echo "$(CURDIR)" > $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/rkv-local-dev.pth
	printf '#!/bin/sh\nexec "%s" -m rkv_local "$$@"\n' "$(CURDIR)/$(BIN)/python" > $(BIN)/rkv-local
	chmod +x $(BIN)/rkv-local
	touch $@

build: $(LIB)

$(LIB): $(DEPS_STAMP) $(NATIVE_SRC)
	$(BIN)/cmake -S . -B build -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(BIN)/ninja \
		-DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(CURDIR)/$(BIN)/python $(CMAKE_ARGS)
	$(BIN)/cmake --build build -j $(JOBS)
	$(BIN)/cmake --install build --prefix .
	touch $@

demo: build
	$(BIN)/python -m rkv_local.demo

test: build
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build $(VENV) rkv_local/lib
