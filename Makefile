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

# the sanitizer build: its own build folder and library, loaded through RKV_LOCAL_LIB_DIR
ASAN_BUILD := build-asan
ASAN_LIB   := $(ASAN_BUILD)/install/rkv_local/lib/libllama.so
ASAN_TESTS ?= tests/test_engine.py tests/test_fused.py tests/test_refusals.py tests/test_llama_api.py \
              tests/test_bad_input.py tests/test_fuzz.py tests/test_iswa.py

# the Vulkan build (test-vulkan): its own folder and library
VULKAN_BUILD := build-vulkan
VULKAN_LIB   := $(VULKAN_BUILD)/install/rkv_local/lib/libllama.so
# SmolLM2's 1,300-token run takes hours on a software driver; the tiny models' long runs stand for it
VULKAN_TESTS ?= tests/test_engine.py tests/test_iswa.py \
	--deselect tests/test_engine.py::test_smollm2_long_generation_stays_within_budget
VULKAN_CMAKE_ARGS ?=

# llama.cpp's own llama-perplexity, the reference tests check eval fidelity's KLD statistics against
PERPLEXITY := build/bin/llama-perplexity

.PHONY: all venv build demo test test-asan test-vulkan gpu-pack gpu-dryrun llama-perplexity clean

all: build

venv: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the bindings only: llama.cpp itself is built below, from the same release's source
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(BIN)/python -m pip install -q "llama-cpp-python==0.3.36"
	# pyproject.toml's requirements and its test, server and evals extras, plus the build tools
	$(BIN)/python rkv_local/requirements.py test server evals > $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/requirements.txt cmake ninja
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

test: build $(PERPLEXITY)
	$(BIN)/python -m pytest -q tests

llama-perplexity: $(PERPLEXITY)

$(PERPLEXITY): $(LIB)
	$(BIN)/cmake -S . -B build -DRKV_PERPLEXITY=ON
	$(BIN)/cmake --build build -j $(JOBS) --target llama-perplexity

$(ASAN_LIB): $(DEPS_STAMP) $(NATIVE_SRC)
	$(BIN)/cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(BIN)/ninja \
		-DCMAKE_BUILD_TYPE=RelWithDebInfo -DRKV_SANITIZE=ON -DPython3_EXECUTABLE=$(CURDIR)/$(BIN)/python $(CMAKE_ARGS)
	$(BIN)/cmake --build $(ASAN_BUILD) -j $(JOBS)
	$(BIN)/cmake --install $(ASAN_BUILD) --prefix $(ASAN_BUILD)/install
	touch $@

# The engine, refusal, bad-input and fuzz tests on the library built with AddressSanitizer and
# UndefinedBehaviorSanitizer; any report fails the run. Python is not instrumented: the ASan runtime
# is preloaded, and leak checking is left to tests/test_leaks.py (the interpreter's own would drown it).
test-asan: $(ASAN_LIB)
	RKV_LOCAL_LIB_DIR=$(CURDIR)/$(dir $(ASAN_LIB)) \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1 \
		$(BIN)/python -m pytest -q -p no:cacheprovider $(ASAN_TESTS)

# The engine tests with every layer, and so the KV cache, on a Vulkan device (a GPU, or Mesa's
# lavapipe on a machine without one), built into build-vulkan/. Installs nothing itself: it needs
# the Vulkan loader and headers new enough for ggml-vulkan (VK_EXT_layer_settings: Vulkan-Headers
# 1.3.261 or later; VULKAN_CMAKE_ARGS="-DVulkan_INCLUDE_DIR=..." for headers of your own), glslc
# and a driver (Debian: libvulkan-dev glslc mesa-vulkan-drivers). ggml skips CPU-type devices such as
# lavapipe unless named: device 0 unless GGML_VK_VISIBLE_DEVICES says otherwise.
test-vulkan: $(VULKAN_LIB)
	GGML_VK_VISIBLE_DEVICES=$${GGML_VK_VISIBLE_DEVICES-0} \
	RKV_LOCAL_LIB_DIR=$(CURDIR)/$(dir $(VULKAN_LIB)) RKV_TEST_N_GPU_LAYERS=-1 PYTHONPATH=tests \
		$(BIN)/python -m pytest -q -p no:cacheprovider -p gpu_offload $(VULKAN_TESTS)

# the GPU check (scripts/gpu_check.sh) for the offline GPU machine: pack what it lacks into .gpu/, and
# prove here that the check runs from a fresh clone plus .gpu/ alone, without network (too long for CI)
gpu-pack: $(LIB)
	scripts/gpu_pack.sh

gpu-dryrun: gpu-pack
	scripts/gpu_dryrun.sh

$(VULKAN_LIB): $(DEPS_STAMP) $(NATIVE_SRC)
	$(BIN)/cmake -S . -B $(VULKAN_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(BIN)/ninja \
		-DCMAKE_BUILD_TYPE=Release -DGGML_VULKAN=ON -DPython3_EXECUTABLE=$(CURDIR)/$(BIN)/python \
		$(CMAKE_ARGS) $(VULKAN_CMAKE_ARGS)
	$(BIN)/cmake --build $(VULKAN_BUILD) -j $(JOBS)
	$(BIN)/cmake --install $(VULKAN_BUILD) --prefix $(VULKAN_BUILD)/install
	touch $@

clean:
	rm -rf build $(ASAN_BUILD) $(VULKAN_BUILD) $(VENV) rkv_local/lib
