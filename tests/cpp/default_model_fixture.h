// DefaultModelTest: a gtest fixture base for tests that run the default model package
// (models/smollm2-135m-instruct, or DYSCO_TEST_MODEL_DIR). The package is loaded once per test
// suite through Engine::Load (no scheduler thread, a small KV pool); runner_, tokenizer_ and
// factory_ point into that engine. A test whose package is missing is skipped, or fails when the
// environment variable CI is set (CI must never pass by skipping).
//
// Thread-safety: the static engine and its pointers are written only by SetUpTestSuite /
// TearDownTestSuite (gtest's main thread); tests may share them as the core types allow.
//
// Ownership: the fixture owns engine_ from SetUpTestSuite until TearDownTestSuite, which deletes
// it; runner_, tokenizer_ and factory_ are borrowed from it. All stay null when the package is
// missing or failed to load. Pools made by MakePool belong to the test and must be destroyed before
// the suite ends. A derived SetUp must call DefaultModelTest::SetUp() first and return when
// ModelMissing().
#pragma once

#include <unistd.h>

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

// DYSCO_TEST_MODEL_DIR overrides the package location (e.g. a package exported elsewhere).
inline const std::string kModelDir =
    std::getenv("DYSCO_TEST_MODEL_DIR") != nullptr
        ? std::getenv("DYSCO_TEST_MODEL_DIR")
        : std::string(DYSCO_SOURCE_DIR) + "/models/smollm2-135m-instruct";

class DefaultModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::access((kModelDir + "/model.pt").c_str(), R_OK) != 0) return;
    EngineOptions options;
    options.start_scheduler = false;
    options.kv_pages = 16;  // the engine's own pool; tests make theirs with MakePool
    auto e = Engine::Load(kModelDir, std::move(options));
    ASSERT_TRUE(e.ok()) << e.status().ToString();
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
      if (std::getenv("CI") != nullptr) FAIL() << kModelDir << " is missing (run `make model`)";
      GTEST_SKIP() << kModelDir << " is missing (run `make model`)";
    }
  }

  // True when the base SetUp skipped or failed the test, so a derived SetUp must stop.
  bool ModelMissing() const { return IsSkipped() || HasFatalFailure(); }

  std::unique_ptr<KvPagePool> MakePool(int64_t pages) {
    KvPagePoolOptions o;
    o.page_size = 16;
    o.num_pages = pages;
    auto pool = KvPagePool::Create(runner_->config(), o);
    EXPECT_TRUE(pool.ok()) << pool.status().ToString();
    return std::move(pool).value();
  }

  inline static Engine* engine_ = nullptr;
  inline static ModelRunner* runner_ = nullptr;
  inline static const Tokenizer* tokenizer_ = nullptr;
  inline static const SequenceFactory* factory_ = nullptr;
};

}  // namespace dysco
