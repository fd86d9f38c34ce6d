// TinyModelTest: a gtest fixture base for tests that run the tiny random llama package
// (`tools.dysco_export tiny --family llama --seed 0`: 4 layers, 4 query heads, SmolLM2's tokenizer
// and chat template, DySCO heads (1, 0), (2, 3)). ctest exports it once per run (the
// `export_tiny_model` fixture, tests/CMakeLists.txt) and names its directory in
// DYSCO_TINY_MODEL_DIR; for a manual run, export it yourself and set the variable (from the
// repository root):
//   .venv/bin/python -m tools.dysco_export tiny --family llama --seed 0
//       --out build/test-models/tiny-llama --kernels build/lib/libdysco_kernels.so
//   DYSCO_TINY_MODEL_DIR=build/test-models/tiny-llama build/bin/test_dysco
// The package is loaded once per test suite through Engine::Load (no scheduler thread). Without the
// variable a test is skipped, or fails when CI is set (CI must never pass by skipping); a package
// that is named but does not load always fails.
//
// Thread-safety: the static engine and its pointers are written only by SetUpTestSuite /
// TearDownTestSuite (gtest's main thread).
// Ownership: the fixture owns engine_ from SetUpTestSuite until TearDownTestSuite; runner_,
// tokenizer_ and factory_ are borrowed from it. Pools made by MakePool belong to the test.
// A derived SetUp must call TinyModelTest::SetUp() first and return when ModelMissing().
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>

#include <gtest/gtest.h>

#include "core/engine/engine.h"
#include "core/engine/request.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"
#include "core/text/tokenizer.h"

namespace dysco {

class TinyModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const char* dir = std::getenv("DYSCO_TINY_MODEL_DIR");
    named_ = dir != nullptr && *dir != '\0';
    if (!named_) {
      error_ =
          "DYSCO_TINY_MODEL_DIR is not set (ctest's export_tiny_model fixture sets it; see "
          "tests/cpp/tiny_model_fixture.h for a manual run)";
      return;
    }
    EngineOptions options;
    options.start_scheduler = false;
    options.kv_pages = 16;  // the engine's own pool; tests make theirs with MakePool
    auto e = Engine::Load(dir, std::move(options));
    if (!e.ok()) {
      error_ =
          std::string("cannot load the tiny model package ") + dir + ": " + e.status().ToString();
      return;
    }
    engine_ = std::move(e).value().release();
    runner_ = &engine_->runner();
    tokenizer_ = &engine_->tokenizer();
    factory_ = &engine_->factory();
  }
  static void TearDownTestSuite() {
    runner_ = nullptr;
    tokenizer_ = nullptr;
    factory_ = nullptr;
    delete engine_;
    engine_ = nullptr;
  }

  void SetUp() override {
    if (engine_ == nullptr) {
      if (named_ || std::getenv("CI") != nullptr) FAIL() << error_;
      GTEST_SKIP() << error_;
    }
  }

  // True when the base SetUp skipped or failed the test, so a derived SetUp must stop.
  bool ModelMissing() const { return IsSkipped() || HasFatalFailure(); }

  static std::unique_ptr<KvPagePool> MakePool(int page_size, int64_t pages) {
    KvPagePoolOptions o;
    o.page_size = page_size;
    o.num_pages = pages;
    auto pool = KvPagePool::Create(runner_->config(), o);
    EXPECT_TRUE(pool.ok()) << pool.status().ToString();
    return pool.ok() ? std::move(pool).value() : nullptr;
  }

  inline static Engine* engine_ = nullptr;
  inline static ModelRunner* runner_ = nullptr;
  inline static const Tokenizer* tokenizer_ = nullptr;
  inline static const SequenceFactory* factory_ = nullptr;
  inline static bool named_ = false;
  inline static std::string error_;
};

}  // namespace dysco
