#include "core/engine/engine.h"

#include <utility>
#include <vector>

namespace dysco {
namespace {

// A config.json that is valid but contradicts model.pt (another head count, vocabulary or dtype)
// would load, report SERVING and fail every request inside the model. One forward of one token
// through every layer, with the package's DySCO probe heads, shows it at load instead: the KV pool
// and the op checks are shaped by config.json, the tensors by model.pt.
Status CheckPackageForward(const std::string& package_dir, const ModelConfig& config,
                           ModelRunner* runner, KvPagePool* pool) {
  DYSCO_ASSIGN_OR_RETURN(std::vector<int32_t> pages, pool->Allocate(1));
  const std::vector<int32_t> token = {0};
  ForwardBatch batch;
  batch.kv_pool = pool;
  batch.sequences.push_back(ForwardRow{token, 0, pages, {}});
  batch.probe_heads = config.dysco.selected_heads;
  ForwardOutput out;
  const Status st = runner->Forward(batch, &out);
  (void)pool->Free(pages);  // pages it just handed out: Free cannot refuse them
  std::string problem;
  if (!st.ok()) {
    problem = st.message();
  } else if (out.vocab_size != config.vocab_size) {
    problem = "model returned " + std::to_string(out.vocab_size) +
              " logits, config says vocab_size " + std::to_string(config.vocab_size);
  }
  if (problem.empty()) return OkStatus();
  // TorchScript's messages span many lines (the interpreter's stack, then the error itself): the
  // last non-empty line says what failed, which is what a one-line load error needs.
  const size_t end = problem.find_last_not_of(" \n");
  if (end != std::string::npos) {
    problem.erase(end + 1);
    const size_t line = problem.rfind('\n');
    if (line != std::string::npos) problem = problem.substr(line + 1);
  }
  if (problem.size() > 600) problem = problem.substr(0, 600) + "...";
  return FailedPreconditionError(package_dir + ": config.json does not match model.pt (a check " +
                                 "forward of one token failed): " + problem);
}

}  // namespace

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
  } else if (o.kv_cache_fraction != 0.0) {  // KvPagePool::Create checks its range
    // The runner is loaded (weights on the device): the fraction is of what is left.
    pool_options.memory_fraction = o.kv_cache_fraction;
  } else {
    pool_options.max_bytes = o.kv_cache_bytes;
  }
  DYSCO_ASSIGN_OR_RETURN(e->pool_, KvPagePool::Create(e->config(), pool_options));
  if (o.check_package) {
    DYSCO_RETURN_IF_ERROR(
        CheckPackageForward(package_dir, e->config(), e->runner_.get(), e->pool_.get()));
  }
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
