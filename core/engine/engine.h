// Engine: one loaded model package and everything that serves it: the ModelRunner, the tokenizer,
// the KV page pool, the SequenceFactory (request validation) and, unless asked not to, the
// Scheduler with its engine thread. Engine::Load is the one way the server, the tools, the
// benchmarks and the test fixtures load a package.
//
// Thread-safety: the accessors may be called from any thread; each part is as thread-safe as its
// own header says. Ownership: the Engine owns every part; they are destroyed in reverse order (the
// scheduler, which stops the engine thread and ends its sessions, before what it references).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/base/status.h"
#include "core/engine/generator.h"
#include "core/engine/request.h"
#include "core/engine/scheduler.h"
#include "core/model/kv_page_pool.h"
#include "core/model/model_config.h"
#include "core/model/model_runner.h"
#include "core/text/tokenizer.h"

namespace dysco {

struct EngineOptions {
  ModelRunnerOptions runner;  // threads, device (the KV pool lives on the same device)
  int page_size = 16;
  int64_t kv_pages = 0;  // > 0: exactly this many usable pages
  // Otherwise, when != 0 (in (0, 1], CUDA devices only): the largest pool that fits in this
  // fraction of the device memory free once the model is loaded
  // (KvPagePoolOptions::memory_fraction).
  double kv_cache_fraction = 0.0;
  int64_t kv_cache_bytes = 1LL << 30;  // otherwise: the largest pool that fits in this
  RequestLimits limits;
  bool start_scheduler = true;  // false: no engine thread (tools that use a Generator)
  // One forward of one token at load, so that a config.json contradicting model.pt fails Load
  // (FAILED_PRECONDITION) instead of every request.
  bool check_package = true;
  SchedulerOptions scheduler;
  SchedulerObserver observer;
};

class Engine {
 public:
  // The loaders' statuses: NOT_FOUND / INVALID_ARGUMENT for a missing or bad package,
  // FAILED_PRECONDITION when the op library is not registered, INVALID_ARGUMENT for bad options,
  // RESOURCE_EXHAUSTED when the KV pool cannot be allocated, FAILED_PRECONDITION when config.json
  // does not match model.pt (check_package).
  static StatusOr<std::unique_ptr<Engine>> Load(const std::string& package_dir,
                                                EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const ModelConfig& config() const { return runner_->config(); }
  ModelRunner& runner() { return *runner_; }
  KvPagePool& pool() { return *pool_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const SequenceFactory& factory() const { return *factory_; }
  // Only when loaded with start_scheduler (else null).
  Scheduler* scheduler() { return scheduler_.get(); }
  const EngineOptions& options() const { return options_; }

  // A Generator over this engine's runner, pool and factory.
  Generator MakeGenerator(GeneratorOptions options = {}) {
    return Generator(runner_.get(), pool_.get(), factory_.get(), options);
  }

 private:
  explicit Engine(EngineOptions options) : options_(std::move(options)) {}

  EngineOptions options_;
  std::unique_ptr<ModelRunner> runner_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<KvPagePool> pool_;
  std::unique_ptr<SequenceFactory> factory_;
  std::unique_ptr<Scheduler> scheduler_;
};

}  // namespace dysco
