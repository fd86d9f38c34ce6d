// Gtest fixture bases for tests that run a model package, one per package, sharing one loader:
//   DefaultModelTest: the default package, models/smollm2-135m-instruct (or DYSCO_TEST_MODEL_DIR).
//     Missing: the test is skipped, or fails when CI is set (CI must never pass by skipping).
//   TinyModelTest: the tiny random llama (`tools.dysco_export tiny --family llama --seed 0`: 4
//     layers, 4 query heads, SmolLM2's tokenizer and chat template, DySCO heads (1, 0), (2, 3)).
//     ctest exports it once per run (the `export_tiny_model` fixture, tests/CMakeLists.txt) and
//     names its directory in DYSCO_TINY_MODEL_DIR; for a manual run, from the repository root:
//       .venv/bin/python -m tools.dysco_export tiny --family llama --seed 0
//           --out build/test-models/tiny-llama --kernels build/lib/libdysco_kernels.so
//       DYSCO_TINY_MODEL_DIR=build/test-models/tiny-llama build/bin/test_dysco
//     Unset: skipped, or failed under CI; named but not loadable: always failed.
// The package is loaded once per test suite through Engine::Load (no scheduler thread, a small KV
// pool); runner_, tokenizer_ and factory_ point into that engine.
//
// Thread-safety: the static engine and its pointers are written only by SetUpTestSuite /
// TearDownTestSuite (gtest's main thread); tests may share them as the core types allow.
// Ownership: the fixture owns engine_ from SetUpTestSuite until TearDownTestSuite, which deletes
// it; the pointers are borrowed from it and stay null when the package is missing or failed to
// load. Pools made by MakePool belong to the test and must be destroyed before the suite ends. A
// derived SetUp must call the base SetUp() first and return when ModelMissing().
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "core/engine/engine.h"
#include "core/engine/request.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_runner.h"
#include "core/text/tokenizer.h"

namespace dysco {

// DYSCO_TEST_MODEL_DIR overrides the default package's location (e.g. a package exported
// elsewhere).
inline const std::string kModelDir =
    std::getenv("DYSCO_TEST_MODEL_DIR") != nullptr
        ? std::getenv("DYSCO_TEST_MODEL_DIR")
        : std::string(DYSCO_SOURCE_DIR) + "/models/smollm2-135m-instruct";

// Where a package is, and how its absence is judged.
struct PackageLocation {
  std::string dir;       // empty: not named at all
  bool present = false;  // worth trying to load
  std::string missing;   // the message when it is not present
};

struct DefaultPackage {
  static PackageLocation Locate() {
    PackageLocation l;
    l.dir = kModelDir;
    l.present = ::access((kModelDir + "/model.pt").c_str(), R_OK) == 0;
    l.missing = kModelDir + " is missing (run `make model`)";
    return l;
  }
};

struct TinyPackage {
  static PackageLocation Locate() {
    PackageLocation l;
    const char* dir = std::getenv("DYSCO_TINY_MODEL_DIR");
    if (dir != nullptr) l.dir = dir;
    l.present = !l.dir.empty();
    l.missing =
        "DYSCO_TINY_MODEL_DIR is not set (ctest's export_tiny_model fixture sets it; see "
        "tests/cpp/model_fixture.h for a manual run)";
    return l;
  }
};

template <typename Package>
class PackageTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const PackageLocation where = Package::Locate();
    error_ = where.missing;
    load_failed_ = false;
    if (!where.present) return;
    EngineOptions options;
    options.start_scheduler = false;
    options.kv_pages = 16;  // the engine's own pool; tests make theirs with MakePool
    auto e = Engine::Load(where.dir, std::move(options));
    if (!e.ok()) {
      load_failed_ = true;
      error_ = "cannot load the model package " + where.dir + ": " + e.status().ToString();
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
      if (load_failed_ || std::getenv("CI") != nullptr) FAIL() << error_;
      GTEST_SKIP() << error_;
    }
  }

  // True when the base SetUp skipped or failed the test, so a derived SetUp must stop.
  bool ModelMissing() const { return this->IsSkipped() || this->HasFatalFailure(); }

  // A pool of `pages` usable pages of `page_size` tokens for this package's model.
  static std::unique_ptr<KvPagePool> MakePool(int page_size, int64_t pages) {
    KvPagePoolOptions o;
    o.page_size = page_size;
    o.num_pages = pages;
    auto pool = KvPagePool::Create(runner_->config(), o);
    EXPECT_TRUE(pool.ok()) << pool.status().ToString();
    return pool.ok() ? std::move(pool).value() : nullptr;
  }
  static std::unique_ptr<KvPagePool> MakePool(int64_t pages) { return MakePool(16, pages); }

  // Random prompt ids (fixed seed) with the package's template sequences written in at fixed
  // places, so that template positions exist (and can get selected).
  static std::vector<int32_t> TemplatedPrompt(int64_t len, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int32_t> id(3, 2000);
    std::vector<int32_t> p(len);
    for (auto& t : p) t = id(rng);
    const auto& templates = runner_->config().dysco.template_sequences;
    for (size_t k = 0; k < templates.size(); ++k) {
      const size_t at = (k * 7) % static_cast<size_t>(len);
      for (size_t j = 0; j < templates[k].size() && at + j < p.size(); ++j) {
        p[at + j] = templates[k][j];
      }
    }
    return p;
  }

  inline static Engine* engine_ = nullptr;
  inline static ModelRunner* runner_ = nullptr;
  inline static const Tokenizer* tokenizer_ = nullptr;
  inline static const SequenceFactory* factory_ = nullptr;
  inline static bool load_failed_ = false;
  inline static std::string error_;
};

using DefaultModelTest = PackageTest<DefaultPackage>;
using TinyModelTest = PackageTest<TinyPackage>;

}  // namespace dysco
