# The two commands of README.md: `make run` and `make test`. Everything they need is installed here.
BUILD_DIR ?= build
BUILD_TYPE ?= Release
CMAKE_FLAGS ?=
PY := .venv/bin/python
MODEL_DIR := models/smollm2-135m-instruct
JOBS ?= $(shell nproc)

.PHONY: deps python configure build model run test test-cpp test-python bench clean format

deps:
	bash scripts/install-deps.sh

python: deps
	bash scripts/setup-python.sh

configure: deps
	cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) $(CMAKE_FLAGS)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

# The default model package: exported from the GGUF once, re-exported when the exporter changes.
model: python build
	$(PY) -m tools.dysco_export gguf --gguf "$$(bash scripts/fetch-default-model.sh)" \
	    --out $(MODEL_DIR) --kernels $(BUILD_DIR)/lib/libdysco_kernels.so --skip-if-current

run: model
	$(BUILD_DIR)/bin/dysco-generate --model $(MODEL_DIR) --chat \
	    --prompt "What is the capital of France? Answer in one sentence." --max-new-tokens 48

test-cpp: model
	cd $(BUILD_DIR) && ctest --output-on-failure -j 2

test-python: model
	$(PY) -m pytest -q tests/python

test: test-cpp test-python

bench: model
	$(BUILD_DIR)/bin/bench-decode --model $(MODEL_DIR)

format:
	clang-format -i $$(git ls-files '*.cpp' '*.h' '*.cu')

clean:
	rm -rf $(BUILD_DIR)
