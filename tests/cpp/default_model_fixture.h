// DefaultModelTest: a gtest fixture base for tests that run the default model package
// (models/smollm2-135m-instruct, or DYSCO_TEST_MODEL_DIR). The runner and tokenizer are loaded once
// per test suite; a test whose package is missing is skipped, or fails when the environment
// variable CI is set (CI must never pass by skipping).
//
// Thread-safety: the static runner and tokenizer are written only by SetUpTestSuite /
// TearDownTestSuite (gtest's main thread); tests may share them as the core types allow.
//
// Ownership: the fixture owns runner_ and tokenizer_ from SetUpTestSuite until TearDownTestSuite,
// which deletes them; they stay null when the package is missing or failed to load. A derived SetUp
// must call DefaultModelTest::SetUp() first and return when ModelMissing().
#pragma once

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>

#include <gtest/gtest.h>

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
    if (!std::filesystem::exists(kModelDir + "/model.pt")) return;
    auto r = ModelRunner::Load(kModelDir);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    runner_ = std::move(r).value().release();
    auto t = Tokenizer::FromFile(kModelDir + "/tokenizer.json");
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tokenizer_ = std::move(t).value().release();
  }
  static void TearDownTestSuite() {
    delete runner_;
    delete tokenizer_;
    runner_ = nullptr;
    tokenizer_ = nullptr;
  }

  void SetUp() override {
    if (runner_ == nullptr || tokenizer_ == nullptr) {
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

  inline static ModelRunner* runner_ = nullptr;
  inline static Tokenizer* tokenizer_ = nullptr;
};

}  // namespace dysco
