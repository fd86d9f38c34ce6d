#include "server/generation_service.h"

#include <chrono>
#include <cstdio>
#include <iterator>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/base/thread_annotations.h"
#include "proto/support/grpc_code_names.h"
#include "server/grpc_status.h"
#include "server/request_conversion.h"

namespace dysco::server {
namespace {

const grpc::Status kLoading(grpc::StatusCode::UNAVAILABLE, "the model is loading");

const char* InputName(v1::GenerateRequest::InputCase input) {
  switch (input) {
    case v1::GenerateRequest::kPrompt:
      return "prompt";
    case v1::GenerateRequest::kMessages:
      return "messages";
    case v1::GenerateRequest::kTokenIds:
      return "token_ids";
    case v1::GenerateRequest::INPUT_NOT_SET:
      break;
  }
  return "none";
}

v1::FinishReason ToProtoFinish(FinishReason finish) {
  switch (finish) {
    case FinishReason::kStop:
      return v1::STOP;
    case FinishReason::kLength:
      return v1::LENGTH;
    case FinishReason::kStopString:
      return v1::STOP_STRING;
    case FinishReason::kCancelled:
    case FinishReason::kDeadlineExceeded:
      return v1::CANCELLED;
    case FinishReason::kNone:
    case FinishReason::kError:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void AppendEvent(const SessionEvent& event, v1::GenerateResponse* out) {
  out->mutable_text()->append(event.text);
  out->mutable_token_ids()->Add(event.token_ids.begin(), event.token_ids.end());
  for (const SelectionEvent& s : event.selection) {
    v1::StepSelection* sel = out->add_selection();
    sel->set_position(s.position);
    sel->set_phase(DyscoPhaseName(s.phase));
    sel->set_num_selected(s.num_selected);
    sel->set_nucleus_mass(static_cast<float>(s.nucleus_mass));
    for (const auto& [start, end] : s.ranges) {
      v1::SelectedRange* r = sel->add_ranges();
      r->set_start(start);
      r->set_end(end);
    }
  }
}

void SetUsage(const SessionUsage& u, v1::Usage* out) {
  out->set_prompt_tokens(static_cast<uint32_t>(u.prompt_tokens));
  out->set_generated_tokens(static_cast<uint32_t>(u.generated_tokens));
  out->set_queue_seconds(u.queue_seconds);
  out->set_time_to_first_token_seconds(u.time_to_first_token_seconds);
  out->set_total_seconds(u.total_seconds);
  out->set_dysco_overhead_seconds(u.dysco_overhead_seconds);
}

bool HasContent(const v1::GenerateResponse& r) {
  return !r.text().empty() || r.token_ids_size() > 0 || r.selection_size() > 0;
}

// The RPC's deadline on the steady clock, or none when the client set none.
std::optional<std::chrono::steady_clock::time_point> SteadyDeadline(
    const grpc::CallbackServerContext& context) {
  const auto deadline = context.deadline();
  const auto now = std::chrono::system_clock::now();
  // gRPC reports "no deadline" as the far future.
  if (deadline >= now + std::chrono::hours(24 * 365)) return std::nullopt;
  return std::chrono::steady_clock::now() +
         std::chrono::duration_cast<std::chrono::steady_clock::duration>(deadline - now);
}

}  // namespace

// One Generate RPC. Events of its session arrive on the engine thread (OnEvent), gRPC reactions on
// gRPC threads; `mu_` guards the state both touch and is never held across a gRPC call. The reactor
// writes only after Submit returned (so that its session id is known and OnDone, which deletes it,
// cannot run while Start is still inside Submit).
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(GenerationService* service, Engine* engine, grpc::CallbackServerContext* context)
      : service_(service),
        engine_(engine),
        context_(context),
        start_time_(std::chrono::steady_clock::now()) {}

  // Validates and submits; on failure finishes the RPC with the mapped status.
  void Start(const v1::GenerateRequest& request) {
    auto session = ToSessionRequest(request);
    if (!session.ok()) return Refuse(request.request_id(), session.status());
    if (session->request_id.empty()) session->request_id = service_->NewRequestId();
    request_id_ = session->request_id;
    session->deadline = SteadyDeadline(*context_);
    const bool has_deadline = session->deadline.has_value();
    dysco_ = session->generate.dysco;

    auto id = engine_->scheduler()->Submit(std::move(session).value(),
                                           [this](const SessionEvent& e) { OnEvent(e); });
    if (!id.ok()) return Refuse(request_id_, ToProtoFieldPath(id.status()));
    spdlog::info(
        "request_start request_id={} peer={} input={} chat={} max_new_tokens={} dysco={} "
        "return_selection={} deadline={}",
        request_id_, context_->peer(), InputName(request.input_case()), request.chat(),
        request.max_new_tokens(), dysco_ ? "on" : "off", request.return_selection(),
        has_deadline ? "set" : "none");
    bool cancel = false;
    Step step;
    {
      MutexLock lock(&mu_);
      session_id_ = *id;
      submitted_ = true;
      cancel = cancel_requested_;
      step = NextStepLocked();
    }
    if (cancel) engine_->scheduler()->Cancel(*id);
    Run(std::move(step));  // may finish the RPC: `this` must not be touched after it
  }

  void OnWriteDone(bool ok) override {
    bool cancel = false;
    SessionId id = 0;
    Step step;
    {
      MutexLock lock(&mu_);
      id = session_id_;
      write_in_flight_ = false;
      if (!ok && !broken_) {
        broken_ = true;  // the client is gone: stop generating for it
        cancel = true;
      }
      step = NextStepLocked();
    }
    if (cancel) engine_->scheduler()->Cancel(id);
    Run(std::move(step));
  }

  void OnCancel() override {
    bool cancel = false;
    SessionId id = 0;
    {
      MutexLock lock(&mu_);
      id = session_id_;
      broken_ = true;
      client_cancelled_ = true;
      if (submitted_) {
        cancel = true;
      } else {
        cancel_requested_ = true;
      }
    }
    if (cancel) engine_->scheduler()->Cancel(id);
  }

  void OnDone() override {
    LogDone();
    delete this;
  }

 private:
  // After Finish no other thread touches the reactor; the lock is for the analysis' sake.
  void LogDone() {
    MutexLock lock(&mu_);
    const auto elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time_).count();
    if (refused_) {
      spdlog::info("request_refused request_id={} code={} message=\"{}\" seconds={:.4f}",
                   request_id_, GrpcCodeName(final_status_.error_code()),
                   final_status_.error_message(), elapsed);
    } else {
      spdlog::info(
          "request_finish request_id={} finish_reason={} status={} prompt_tokens={} "
          "generated_tokens={} queue_s={:.4f} ttft_s={:.4f} total_s={:.4f} dysco_overhead_s={:.4f} "
          "dysco={} messages={}",
          request_id_, FinishReasonName(finish_), GrpcCodeName(final_status_.error_code()),
          usage_.prompt_tokens, usage_.generated_tokens, usage_.queue_seconds,
          usage_.time_to_first_token_seconds, usage_.total_seconds, usage_.dysco_overhead_seconds,
          dysco_ ? "on" : "off", messages_written_);
    }
  }

  enum class Action { kNone, kWrite, kWriteAndFinish, kFinish };
  struct Step {
    Action action = Action::kNone;
    grpc::Status status;
  };

  // Engine thread. Never blocks: it appends to the pending message and, when no write is in flight,
  // starts one.
  void OnEvent(const SessionEvent& event) {
    Step step;
    {
      MutexLock lock(&mu_);
      if (!broken_) AppendEvent(event, &pending_);
      if (event.final) FinalizeLocked(event);
      step = NextStepLocked();
    }
    Run(std::move(step));
  }

  void FinalizeLocked(const SessionEvent& event) REQUIRES(mu_) {
    final_received_ = true;
    finish_ = event.finish;
    usage_ = event.usage;
    switch (event.finish) {
      case FinishReason::kError:
        final_status_ =
            ToGrpcStatus(event.error.ok() ? InternalError("generation failed") : event.error);
        return;
      case FinishReason::kDeadlineExceeded:
        final_status_ = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded");
        broken_ = true;  // the client has given up: nothing more to send
        return;
      case FinishReason::kCancelled:
        if (client_cancelled_) {
          final_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
          return;
        }
        // Cancelled by the server (drain timeout, shutdown): the client still gets what was
        // generated, the usage, and a status that says to retry elsewhere.
        if (service_->draining()) {
          final_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                       "the server is shutting down; the request was cancelled");
        }
        break;
      default:
        break;
    }
    pending_.set_finish_reason(ToProtoFinish(event.finish));
    SetUsage(event.usage, pending_.mutable_usage());
  }

  Step NextStepLocked() REQUIRES(mu_) {
    Step step;
    if (!submitted_ || write_in_flight_ || finish_started_) return step;
    if (broken_) {
      pending_.Clear();
      if (!final_received_) return step;
      finish_started_ = true;
      step.action = Action::kFinish;
      // Nobody reads this status when the client has gone; it is what the logs show.
      const bool keep =
          finish_ == FinishReason::kDeadlineExceeded || finish_ == FinishReason::kError;
      step.status = keep ? final_status_
                         : grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
      final_status_ = step.status;
      return step;
    }
    const bool has_message = HasContent(pending_) || (final_received_ && final_status_.ok()) ||
                             pending_.finish_reason() != v1::FINISH_REASON_UNSPECIFIED;
    if (has_message) {
      writing_.Clear();
      writing_.Swap(&pending_);
      writing_.set_request_id(request_id_);
      ++messages_written_;
      if (final_received_) {
        finish_started_ = true;
        step.action = Action::kWriteAndFinish;
        step.status = final_status_;
      } else {
        write_in_flight_ = true;
        step.action = Action::kWrite;
      }
      return step;
    }
    if (final_received_) {
      finish_started_ = true;
      step.action = Action::kFinish;
      step.status = final_status_;
    }
    return step;
  }

  void Run(Step step) {
    switch (step.action) {
      case Action::kNone:
        return;
      case Action::kWrite:
        StartWrite(&writing_);
        return;
      case Action::kWriteAndFinish:
        StartWriteAndFinish(&writing_, grpc::WriteOptions(), std::move(step.status));
        return;
      case Action::kFinish:
        Finish(std::move(step.status));
        return;
    }
  }

  // Finishes an RPC for which no session exists.
 public:
  void Refuse(const std::string& request_id, const Status& status) {
    // An invalid id is not echoed into the logs.
    request_id_ = request_id.empty()                   ? "-"
                  : ValidateRequestId(request_id).ok() ? request_id
                                                       : "<invalid>";
    refused_ = true;
    grpc::Status final_status = ToGrpcStatus(status);
    {
      MutexLock lock(&mu_);
      final_status_ = final_status;
    }
    Finish(std::move(final_status));
  }

 private:
  GenerationService* const service_;
  Engine* const engine_;
  grpc::CallbackServerContext* const context_;
  const std::chrono::steady_clock::time_point start_time_;
  std::string request_id_;
  bool dysco_ = false;
  bool refused_ = false;

  Mutex mu_;
  SessionId session_id_ GUARDED_BY(mu_) = 0;
  bool submitted_ GUARDED_BY(mu_) = false;
  bool cancel_requested_ GUARDED_BY(mu_) = false;  // OnCancel before Submit returned
  bool client_cancelled_ GUARDED_BY(mu_) = false;
  bool broken_ GUARDED_BY(mu_) = false;  // nothing more is written (client gone, deadline passed)
  bool write_in_flight_ GUARDED_BY(mu_) = false;
  bool final_received_ GUARDED_BY(mu_) = false;
  bool finish_started_ GUARDED_BY(mu_) = false;
  v1::GenerateResponse pending_ GUARDED_BY(mu_);  // coalesced deltas not handed to gRPC yet
  // The message gRPC is writing: filled under mu_, then read by gRPC until OnWriteDone.
  v1::GenerateResponse writing_;
  int64_t messages_written_ GUARDED_BY(mu_) = 0;
  FinishReason finish_ GUARDED_BY(mu_) = FinishReason::kNone;
  SessionUsage usage_ GUARDED_BY(mu_);
  grpc::Status final_status_ GUARDED_BY(mu_);
};

std::string GenerationService::NewRequestId() {
  // A per-process random prefix keeps ids unique across replicas and restarts.
  static const std::string prefix = [] {
    std::random_device rd;
    char buf[16];
    std::snprintf(buf, sizeof(buf), "%08x", static_cast<unsigned>(rd()));
    return std::string(buf);
  }();
  return "req-" + prefix + "-" + std::to_string(next_request_.fetch_add(1));
}

grpc::ServerWriteReactor<v1::GenerateResponse>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  Engine* engine = engine_.load(std::memory_order_acquire);
  auto* reactor = new GenerateReactor(this, engine, context);
  if (engine == nullptr) {
    reactor->Refuse(request->request_id(), UnavailableError("the model is loading"));
  } else if (draining()) {
    reactor->Refuse(request->request_id(), UnavailableError("the server is draining"));
  } else {
    reactor->Start(*request);
  }
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetModelInfoRequest*,
                                                          v1::ModelInfo* info) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Engine* engine = engine_.load(std::memory_order_acquire);
  if (engine == nullptr) {
    reactor->Finish(kLoading);
    return reactor;
  }
  const ModelConfig& c = engine->config();
  info->set_model_name(c.model_name);
  info->set_architecture(c.architecture);
  info->set_context_length(static_cast<uint32_t>(c.max_position_embeddings));
  info->set_vocab_size(static_cast<uint32_t>(c.vocab_size));
  info->set_chat_format(ChatFormatName(c.chat_format));
  info->set_dtype(ModelDtypeName(c.dtype));
  info->set_num_layers(c.num_layers);
  info->set_num_attention_heads(c.num_attention_heads);
  info->set_num_kv_heads(c.num_kv_heads);
  for (const int32_t id : c.special_tokens.eos_token_ids) info->add_eos_token_ids(id);
  info->set_device(engine->runner().device());

  v1::DyscoDefaults* d = info->mutable_dysco_defaults();
  for (const auto& [layer, head] : c.dysco.selected_heads) {
    v1::DyscoHead* h = d->add_selected_heads();
    h->set_layer(layer);
    h->set_head(head);
  }
  d->set_top_p(static_cast<float>(c.dysco.top_p));
  d->set_top_k(c.dysco.top_k);
  d->set_strength(static_cast<float>(c.dysco.strength));
  d->set_decay_factor(static_cast<float>(c.dysco.decay_factor));
  d->set_context_warmup_steps(c.dysco.context_warmup_steps);
  d->set_intervention_warmup(c.dysco.intervention_warmup);
  d->set_dynamic_rescale(c.dysco.dynamic_rescale);
  for (const auto& seq : c.dysco.template_sequences) {
    d->add_template_sequences()->mutable_token_ids()->Add(seq.begin(), seq.end());
  }

  const SchedulerOptions& o = engine->options().scheduler;
  const RequestLimits& request_limits = engine->factory().limits();
  v1::Limits* limits = info->mutable_limits();
  limits->set_max_context_tokens(static_cast<uint32_t>(request_limits.max_context_tokens));
  limits->set_max_new_tokens(static_cast<uint32_t>(request_limits.max_new_tokens_limit));
  limits->set_max_batch_size(static_cast<uint32_t>(o.max_batch_size));
  limits->set_max_queued_requests(static_cast<uint32_t>(o.max_queued));
  limits->set_kv_cache_pages(static_cast<uint32_t>(engine->pool().num_total()));
  limits->set_kv_page_size(static_cast<uint32_t>(engine->pool().page_size()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const v1::TokenizeRequest* request,
                                                      v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Engine* engine = engine_.load(std::memory_order_acquire);
  if (engine == nullptr) {
    reactor->Finish(kLoading);
    return reactor;
  }
  const ModelConfig& config = engine->config();
  const Tokenizer& tokenizer = engine->tokenizer();
  const SequenceFactory& factory = engine->factory();
  auto tokenize = [&]() -> StatusOr<std::vector<int32_t>> {
    GenerateRequest g;  // chat-formatted input is encoded exactly as Generate encodes it
    switch (request->input_case()) {
      case v1::TokenizeRequest::kText:
        if (!request->chat()) {
          std::vector<int32_t> ids = tokenizer.Encode(request->text(), request->parse_special());
          const SpecialTokens& st = config.special_tokens;
          if (!ids.empty() && st.add_bos && st.bos_token_id && ids.front() != *st.bos_token_id) {
            ids.insert(ids.begin(), *st.bos_token_id);
          }
          return ids;
        }
        g.messages.push_back({"user", request->text()});
        break;
      case v1::TokenizeRequest::kMessages:
        if (request->messages().messages_size() == 0) {
          return InvalidArgumentError("messages.messages: must not be empty");
        }
        g.messages = ToChatMessages(request->messages());
        break;
      case v1::TokenizeRequest::INPUT_NOT_SET:
        return InvalidArgumentError("input: one of text, messages is required");
    }
    DYSCO_RETURN_IF_ERROR(factory.Validate(g));
    return factory.BuildPrompt(g);
  };
  auto ids = tokenize();
  if (!ids.ok()) {
    reactor->Finish(ToGrpcStatus(ToProtoFieldPath(ids.status())));
    return reactor;
  }
  for (const int32_t id : *ids) {
    response->add_token_ids(id);
    response->add_tokens(tokenizer.IdToToken(id));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace dysco::server
