#include "server/generation_service.h"

#include <chrono>
#include <cstdio>
#include <iterator>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/base/format.h"
#include "core/base/thread_annotations.h"
#include "proto/support/grpc_code_names.h"
#include "server/grpc_status.h"
#include "server/request_conversion.h"

namespace dysco::server {
namespace {

const grpc::Status kLoading(grpc::StatusCode::UNAVAILABLE, "the model is loading");

// A client's deadline fires on its own clock, before the server's copy of it (which starts when the
// server reads the call's headers, later under load): a cancellation this close to the server's
// deadline is the deadline. (A client that cancels on purpose within this margin of its deadline is
// counted as deadline_exceeded; the soak test found 20 ms too small.)
constexpr auto kClockSlack = std::chrono::seconds(1);

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

// Requests arrive as raw bytes (the methods are registered raw) so that one that does not parse
// gets INVALID_ARGUMENT with a message, not gRPC's UNIMPLEMENTED with none.
template <typename Message>
bool ParseMessage(const grpc::ByteBuffer& raw, Message* message) {
  grpc::ByteBuffer copy(raw);  // Deserialize consumes its buffer; the copy shares the slices
  return grpc::SerializationTraits<Message>::Deserialize(&copy, message).ok();
}

template <typename Message>
void SerializeMessage(const Message& message, grpc::ByteBuffer* out) {
  out->Clear();  // Serialize wants an empty buffer; writing_ still holds the previous message
  bool own_buffer = false;
  const grpc::Status st = grpc::SerializationTraits<Message>::Serialize(message, out, &own_buffer);
  if (!st.ok()) out->Clear();  // cannot happen for a message we built; an empty write is harmless
}

Status UnparseableRequest(const char* type) {
  return InvalidArgumentError(std::string("request: cannot be parsed as ") + type +
                              " (malformed protobuf, or a string field that is not valid UTF-8)");
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
class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateReactor(GenerationService* service, Engine* engine, grpc::CallbackServerContext* context)
      : service_(service),
        engine_(engine),
        context_(context),
        start_time_(std::chrono::steady_clock::now()) {}

  // On a RequestWorkers thread: parses, validates and submits; on failure finishes the RPC with
  // the mapped status.
  void Start(const grpc::ByteBuffer& raw) {
    v1::GenerateRequest request;
    if (!ParseMessage(raw, &request)) {
      return Refuse("", UnparseableRequest("dysco.v1.GenerateRequest"));
    }
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
        QuoteUntrusted(request_id_, kMaxRequestIdBytes), context_->peer(),
        InputName(request.input_case()), request.chat(), request.max_new_tokens(),
        dysco_ ? "on" : "off", request.return_selection(), has_deadline ? "set" : "none");
    bool cancel = false;
    FinishReason reason = FinishReason::kCancelled;
    Step step;
    {
      MutexLock lock(&mu_);
      session_id_ = *id;
      submitted_ = true;
      cancel = cancel_requested_;
      reason = cancel_reason_;
      step = NextStepLocked();
    }
    if (cancel) engine_->scheduler()->Cancel(*id, reason);
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
    // A write fails when the deadline expires too, often before OnCancel runs: the session ends
    // with the reason OnCancel would give, or an expired deadline would count as a cancellation.
    if (cancel) engine_->scheduler()->Cancel(id, GoneReason());
    Run(std::move(step));
  }

  // gRPC reports both a client's cancel and an expired deadline here; the deadline is told apart
  // by the clock, so that it ends the session (and its metrics) as deadline_exceeded.
  void OnCancel() override {
    const FinishReason reason = GoneReason();
    const bool deadline = reason == FinishReason::kDeadlineExceeded;
    bool cancel = false;
    SessionId id = 0;
    {
      MutexLock lock(&mu_);
      id = session_id_;
      broken_ = true;
      client_cancelled_ = !deadline;
      if (submitted_) {
        cancel = true;
      } else {
        cancel_requested_ = true;
        cancel_reason_ = reason;
      }
    }
    if (cancel) engine_->scheduler()->Cancel(id, reason);
  }

  void OnDone() override {
    LogDone();
    delete this;
  }

 private:
  // Why the client went away: its deadline (expired, or about to by the server's clock) or a
  // cancel.
  FinishReason GoneReason() const {
    return context_->deadline() <= std::chrono::system_clock::now() + kClockSlack
               ? FinishReason::kDeadlineExceeded
               : FinishReason::kCancelled;
  }

  // After Finish no other thread touches the reactor; the lock is for the analysis' sake.
  void LogDone() {
    MutexLock lock(&mu_);
    const auto elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time_).count();
    if (refused_) {
      spdlog::info("request_refused request_id={} code={} message={} seconds={:.4f}",
                   QuoteUntrusted(request_id_, kMaxRequestIdBytes),
                   GrpcCodeName(final_status_.error_code()),
                   QuoteUntrusted(final_status_.error_message(), kMaxStatusMessageBytes), elapsed);
    } else {
      spdlog::info(
          "request_finish request_id={} finish_reason={} status={} prompt_tokens={} "
          "generated_tokens={} queue_s={:.4f} ttft_s={:.4f} total_s={:.4f} dysco_overhead_s={:.4f} "
          "dysco={} messages={}",
          QuoteUntrusted(request_id_, kMaxRequestIdBytes), FinishReasonName(finish_),
          GrpcCodeName(final_status_.error_code()), usage_.prompt_tokens, usage_.generated_tokens,
          usage_.queue_seconds, usage_.time_to_first_token_seconds, usage_.total_seconds,
          usage_.dysco_overhead_seconds, dysco_ ? "on" : "off", messages_written_);
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
      pending_.set_request_id(request_id_);
      SerializeMessage(pending_, &writing_);
      pending_.Clear();
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
    // An invalid id is logged quoted and cut, like every client string.
    request_id_ = request_id.empty() ? "-" : request_id;
    refused_ = true;
    grpc::Status final_status = ToGrpcStatus(status);
    service_->CountRefused(final_status.error_code());
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
  FinishReason cancel_reason_ GUARDED_BY(mu_) = FinishReason::kCancelled;
  bool client_cancelled_ GUARDED_BY(mu_) = false;
  bool broken_ GUARDED_BY(mu_) = false;  // nothing more is written (client gone, deadline passed)
  bool write_in_flight_ GUARDED_BY(mu_) = false;
  bool final_received_ GUARDED_BY(mu_) = false;
  bool finish_started_ GUARDED_BY(mu_) = false;
  v1::GenerateResponse pending_ GUARDED_BY(mu_);  // coalesced deltas not handed to gRPC yet
  // The message gRPC is writing: filled under mu_, then read by gRPC until OnWriteDone.
  grpc::ByteBuffer writing_;
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

Status GenerationService::Authenticate(const grpc::CallbackServerContext& context) const {
  if (tokens_ == nullptr) return OkStatus();
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) return tokens_->Check(nullptr);
  const std::string_view value(it->second.data(), it->second.size());
  return tokens_->Check(&value);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* GenerationService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  Engine* engine = engine_.load(std::memory_order_acquire);
  auto* reactor = new GenerateReactor(this, engine, context);
  if (Status auth = Authenticate(*context); !auth.ok()) {
    reactor->Refuse("", auth);
  } else if (engine == nullptr) {
    reactor->Refuse("", UnavailableError("the model is loading"));
  } else if (draining()) {
    reactor->Refuse("", UnavailableError("the server is draining"));
  } else if (!workers_.Post([reactor, request] { reactor->Start(*request); })) {
    reactor->Refuse("", ResourceExhaustedError("too many requests waiting to be prepared"));
  }
  return reactor;
}

void GenerationService::FillModelInfo(Engine& engine, v1::ModelInfo* info) {
  const ModelConfig& c = engine.config();
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
  info->set_device(engine.runner().device());

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

  const SchedulerOptions& o = engine.options().scheduler;
  const RequestLimits& request_limits = engine.factory().limits();
  v1::Limits* limits = info->mutable_limits();
  limits->set_max_context_tokens(static_cast<uint32_t>(request_limits.max_context_tokens));
  limits->set_max_new_tokens(static_cast<uint32_t>(request_limits.max_new_tokens_limit));
  limits->set_max_batch_size(static_cast<uint32_t>(o.max_batch_size));
  limits->set_max_queued_requests(static_cast<uint32_t>(o.max_queued));
  limits->set_kv_cache_pages(static_cast<uint32_t>(engine.pool().num_total()));
  limits->set_kv_page_size(static_cast<uint32_t>(engine.pool().page_size()));
}

grpc::ServerUnaryReactor* GenerationService::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* request,
                                                          grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Engine* engine = engine_.load(std::memory_order_acquire);
  v1::GetModelInfoRequest parsed;
  if (Status auth = Authenticate(*context); !auth.ok()) {
    Refused(auth, reactor);
  } else if (engine == nullptr) {
    reactor->Finish(kLoading);
  } else if (!ParseMessage(*request, &parsed)) {
    Refused(UnparseableRequest("dysco.v1.GetModelInfoRequest"), reactor);
  } else {
    v1::ModelInfo info;
    FillModelInfo(*engine, &info);
    SerializeMessage(info, response);
    reactor->Finish(grpc::Status::OK);
  }
  return reactor;
}

StatusOr<std::vector<int32_t>> GenerationService::TokenizeRequestIds(
    Engine& engine, const v1::TokenizeRequest& request) {
  const SequenceFactory& factory = engine.factory();
  GenerateRequest g;  // chat-formatted input is encoded exactly as Generate encodes it
  g.parse_special_in_messages = request.parse_special();
  std::vector<int32_t> ids;
  switch (request.input_case()) {
    case v1::TokenizeRequest::kText:
      DYSCO_RETURN_IF_ERROR(factory.CheckTextBytes("text", request.text().size()));
      if (request.chat()) {
        g.messages.push_back({"user", request.text()});
        break;
      }
      ids = engine.tokenizer().Encode(request.text(), request.parse_special());
      if (const SpecialTokens& st = engine.config().special_tokens;
          !ids.empty() && st.add_bos && st.bos_token_id && ids.front() != *st.bos_token_id) {
        ids.insert(ids.begin(), *st.bos_token_id);
      }
      break;
    case v1::TokenizeRequest::kMessages:
      if (request.messages().messages_size() == 0) {
        return InvalidArgumentError("messages.messages: must not be empty");
      }
      g.messages = ToChatMessages(request.messages());
      break;
    case v1::TokenizeRequest::INPUT_NOT_SET:
      return InvalidArgumentError("input: one of text, messages is required");
  }
  if (!g.messages.empty()) {
    DYSCO_RETURN_IF_ERROR(factory.Validate(g));
    DYSCO_ASSIGN_OR_RETURN(ids, factory.BuildPrompt(g));
  }
  const int64_t limit = factory.limits().max_context_tokens;
  if (static_cast<int64_t>(ids.size()) > limit) {
    return InvalidArgumentError("input: encodes to " + std::to_string(ids.size()) +
                                " tokens, more than the context of " + std::to_string(limit));
  }
  return ids;
}

void GenerationService::RunTokenize(Engine& engine, const grpc::ByteBuffer& raw,
                                    grpc::ByteBuffer* response, grpc::ServerUnaryReactor* reactor) {
  v1::TokenizeRequest request;
  if (!ParseMessage(raw, &request)) {
    return Refused(UnparseableRequest("dysco.v1.TokenizeRequest"), reactor);
  }
  auto ids = TokenizeRequestIds(engine, request);
  if (!ids.ok()) return Refused(ToProtoFieldPath(ids.status()), reactor);
  v1::TokenizeResponse out;
  for (const int32_t id : *ids) {
    out.add_token_ids(id);
    out.add_tokens(engine.tokenizer().IdToToken(id));
  }
  SerializeMessage(out, response);
  reactor->Finish(grpc::Status::OK);
}

grpc::ServerUnaryReactor* GenerationService::Tokenize(grpc::CallbackServerContext* context,
                                                      const grpc::ByteBuffer* request,
                                                      grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  Engine* engine = engine_.load(std::memory_order_acquire);
  if (Status auth = Authenticate(*context); !auth.ok()) {
    Refused(auth, reactor);
  } else if (engine == nullptr) {
    reactor->Finish(kLoading);
  } else if (!workers_.Post([this, engine, request, response, reactor] {
               RunTokenize(*engine, *request, response, reactor);
             })) {
    Refused(ResourceExhaustedError("too many requests waiting to be prepared"), reactor);
  }
  return reactor;
}

void GenerationService::Refused(const Status& status, grpc::ServerUnaryReactor* reactor) {
  const grpc::Status st = ToGrpcStatus(status);
  CountRefused(st.error_code());
  spdlog::info("request_refused request_id=\"-\" code={} message={}", GrpcCodeName(st.error_code()),
               QuoteUntrusted(st.error_message(), kMaxStatusMessageBytes));
  reactor->Finish(st);
}

}  // namespace dysco::server
