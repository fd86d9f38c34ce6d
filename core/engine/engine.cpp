#include "core/engine/engine.h"

#include <utility>

namespace dysco {

StatusOr<std::unique_ptr<Engine>> Engine::Load(const std::string& package_dir,
                                               EngineOptions options) {
  std::unique_ptr<Engine> e(new Engine(std::move(options)));
  const EngineOptions& o = e->options_;
  DYSCO_ASSIGN_OR_RETURN(e->runner_, ModelRunner::Load(package_dir, o.runner));
  DYSCO_ASSIGN_OR_RETURN(e->tokenizer_, Tokenizer::FromFile(package_dir + "/tokenizer.json"));
  KvPagePoolOptions pool_options;
  pool_options.page_size = o.page_size;
  pool_options.device = o.runner.device;
  if (o.kv_pages > 0) {
    pool_options.num_pages = o.kv_pages;
  } else {
    pool_options.max_bytes = o.kv_cache_bytes;
  }
  DYSCO_ASSIGN_OR_RETURN(e->pool_, KvPagePool::Create(e->config(), pool_options));
  DYSCO_ASSIGN_OR_RETURN(SequenceFactory factory,
                         SequenceFactory::Create(e->config(), *e->tokenizer_, o.limits));
  e->factory_ = std::make_unique<SequenceFactory>(std::move(factory));
  if (o.start_scheduler) {
    DYSCO_ASSIGN_OR_RETURN(e->scheduler_,
                           Scheduler::Create(e->runner_.get(), e->pool_.get(), e->factory_.get(),
                                             o.scheduler, o.observer));
  }
  return e;
}

Engine::~Engine() {
  scheduler_.reset();  // first: its engine thread uses everything below
  factory_.reset();
  pool_.reset();
  tokenizer_.reset();
  runner_.reset();
}

}  // namespace dysco
