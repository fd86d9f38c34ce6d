# The two commands of README.md: `make run` and `make test`. Everything they need is installed here.
BUILD_DIR ?= build
BUILD_TYPE ?= Release
CMAKE_FLAGS ?=
PY := .venv/bin/python
# The default model's weight dtype: float32 (the default; the golden tests' numbers) or bfloat16 (half the
# bytes, decode about twice as fast on this CPU: docs/performance.md "bf16 weights"), e.g.
# `make run MODEL_DTYPE=bfloat16`. Each dtype has its own package directory.
MODEL_DTYPE ?= float32
MODEL_DIR := models/smollm2-135m-instruct$(if $(filter float32,$(MODEL_DTYPE)),,-$(MODEL_DTYPE))
HEADS_DATA := tools/data/detection_synthetic.jsonl
HEADS_EXAMPLES := 12
JOBS ?= $(shell nproc)
FUZZ_SECONDS ?= 20
SOAK_SECONDS ?= 300

.PHONY: deps python configure build model run generate test test-cpp test-python test-fuzz fuzz bench clean \
	format sanitize soak test-cuda-build gpu-check gpu-bench image-test

deps:
	bash scripts/install-deps.sh

python: deps
	bash scripts/setup-python.sh

configure: deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# The default model package: exported from the GGUF once, re-exported when the exporter changes.
# Then its retrieval heads (about a minute on 2 cores, 12 of the examples), again only when the export
# reset them or the detection data, the detection code or the exporter changed (.heads-stamp records them).
model: python build
	$(PY) -m tools.dysco_export gguf --gguf "$$(bash scripts/fetch-default-model.sh)" \
	    --out $(MODEL_DIR) --kernels $(BUILD_DIR)/lib/libdysco_kernels.so --dtype $(MODEL_DTYPE) --skip-if-current
	@stamp="$$(cat $(HEADS_DATA) core/dysco/head_detection.cpp | sha256sum | cut -c1-64) $(HEADS_EXAMPLES)\
	 $$(grep -o '"exporter_version": "[^"]*"' $(MODEL_DIR)/config.json)"; \
	if grep -q '"selected_heads": \[\]' $(MODEL_DIR)/config.json || \
	    [ "$$(cat $(MODEL_DIR)/.heads-stamp 2>/dev/null)" != "$$stamp" ]; then \
	  $(BUILD_DIR)/bin/dysco-detect-heads --model $(MODEL_DIR) --data $(HEADS_DATA) \
	      --max-examples $(HEADS_EXAMPLES) --write-config && echo "$$stamp" > $(MODEL_DIR)/.heads-stamp; \
	fi

# The gRPC server in the foreground (port 50051, /metrics on 9090); Ctrl-C drains and stops it. One intra-op
# thread per CPU; OpenMP's idle threads spin GOMP_SPINCOUNT=20000 (tens of microseconds) before they sleep
# (docs/performance.md "Threads on a busy machine"); set GOMP_SPINCOUNT or OMP_WAIT_POLICY to override.
run: model
	GOMP_SPINCOUNT=$${GOMP_SPINCOUNT:-20000} $(BUILD_DIR)/bin/dysco-server --model $(MODEL_DIR)

generate: model
	GOMP_SPINCOUNT=$${GOMP_SPINCOUNT:-20000} $(BUILD_DIR)/bin/dysco-generate --model $(MODEL_DIR) --chat \
	    --prompt "What is the capital of France? Answer in one sentence." --max-new-tokens 48

# Tests run two at a time on two cores, each with a thread per core: OpenMP's idle threads sleep at once
# (OMP_WAIT_POLICY=PASSIVE) rather than spin against the other test's threads.
test-cpp: model
	cd $(BUILD_DIR) && OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} ctest --output-on-failure -j 2

test-python: model
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m pytest -q tests/python

# The libFuzzer targets (tests/fuzz: tokenizer, chat formats, request validation, config parser, GGUF and
# safetensors readers), built with clang + ASan/UBSan in build-fuzz/ and run FUZZ_SECONDS each.
fuzz: python
	bash scripts/run-fuzz.sh $(FUZZ_SECONDS)

# The short form `make test` runs: 10 s per target (about 1 minute with the fuzz build up to date, under 3 with
# a cold one on 2 cores).
test-fuzz: python
	FUZZ_SEED=1 bash scripts/run-fuzz.sh 10

# The CUDA variant compiles and links (scripts/build-cuda.sh: PyPI's torch 2.11 wheel in .venv-cuda and nvcc,
# no GPU needed), so that a kernel typo fails `make test`. Its tests run on a GPU machine: `make gpu-check`.
test-cuda-build: deps
	bash scripts/build-cuda.sh

# On the GPU machine only (docs/gpu.md): build against its torch, run the GPU tests and the model-free CPU tests.
gpu-check:
	bash scripts/gpu-check.sh

# The GPU benchmark (docs/performance.md "GPU (issue 9)"), on the GPU machine after gpu-check.
gpu-bench:
	bash scripts/gpu-bench.sh

test: test-cpp test-python test-fuzz test-cuda-build

# ASan + UBSan over every C++ test, then TSan over the multi-threaded ones (scripts/sanitize.sh).
sanitize: model
	bash scripts/sanitize.sh asan
	bash scripts/sanitize.sh tsan

# The bounded soak test (tools/soak.py, README "Soak test"): the real server under mixed load for
# SOAK_SECONDS, then its counters against the client's counts, idle gauges, RSS, health. About 6
# minutes with the default 300 s; `make test` runs its 60 s form (tests/python/test_soak.py).
soak: model
	$(PY) tools/soak.py --duration $(SOAK_SECONDS)

# The container image test (scripts/image-test.sh, README "Container image"): builds the CPU image from a
# locally made Debian base with the project compiled inside, runs it and checks generate, health, /metrics,
# non-root and a clean drain on docker stop. Not in `make test`: a cold run compiles the whole project.
image-test:
	bash scripts/image-test.sh

bench: model
	$(BUILD_DIR)/bin/bench-decode --model $(MODEL_DIR)

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu')

clean:
	rm -rf $(BUILD_DIR)
