// libFuzzer target: request validation from raw protobuf bytes, the path of the server's raw
// Generate method up to the engine: parse a dysco.v1.GenerateRequest, convert it
// (server::ToSessionRequest), then SequenceFactory::Validate, BuildPrompt and, for DySCO requests,
// ResolveDyscoParams against the prompt (what SequenceFactory::Create does before it needs a KV
// pool or the op library). Model-free: a SmolLM2-shaped ModelConfig built in code (as
// tests/cpp/test_request.cpp builds it) and SmolLM2's tokenizer.
//
// Invariants: no exception escapes; every refusal is INVALID_ARGUMENT with a non-empty message of
// at most 512 printable ASCII characters (client text is quoted and cut, core/base/format.h), also
// after ToProtoFieldPath; an accepted request's prompt is non-empty, inside the vocabulary, and its
// token ids are the request's own.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>

#include <google/protobuf/stubs/logging.h>

#include "core/dysco/params.h"
#include "core/engine/request.h"
#include "core/model/model_config.h"
#include "core/text/tokenizer.h"
#include "dysco/v1/generation.pb.h"
#include "server/request_conversion.h"
#include "tests/cpp/smollm2_config.h"
#include "tests/fuzz/fuzz_check.h"

namespace dysco {
namespace {

struct World {
  ModelConfig config = SmolLm2Config();
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<SequenceFactory> factory;
  int64_t generation_prompt_tokens = 0;
};

const World& GetWorld() {
  static const World* world = [] {
    auto* w = new World;
    auto t = Tokenizer::FromFile(fuzz::DataPath("smollm2/tokenizer.json"));
    FUZZ_CHECK(t.ok(), t.status().ToString());
    w->tokenizer = std::move(t).value();
    auto f = SequenceFactory::Create(w->config, *w->tokenizer, RequestLimits{});
    FUZZ_CHECK(f.ok(), f.status().ToString());
    w->factory = std::make_unique<SequenceFactory>(std::move(f).value());
    w->generation_prompt_tokens = CountGenerationPromptTokens(w->config, *w->tokenizer);
    return w;
  }();
  return *world;
}

// A refusal a client may see: INVALID_ARGUMENT, a short message of printable ASCII.
void CheckRefusal(const Status& status, const char* stage) {
  FUZZ_CHECK(!status.ok(), std::string(stage) + ": refusal without an error");
  FUZZ_CHECK(status.code() == StatusCode::kInvalidArgument,
             std::string(stage) + ": " + status.ToString());
  const std::string& m = status.message();
  FUZZ_CHECK(!m.empty() && m.size() <= 512,
             std::string(stage) + ": message of " + std::to_string(m.size()) + " bytes");
  for (const char c : m) {
    FUZZ_CHECK(c >= 0x20 && c <= 0x7e, std::string(stage) + ": unescaped byte " +
                                           std::to_string(static_cast<unsigned char>(c)) +
                                           " in message: " + m.substr(0, 200));
  }
  const Status renamed = server::ToProtoFieldPath(status);
  FUZZ_CHECK(renamed.code() == status.code() && !renamed.message().empty(), renamed.ToString());
}

void Fuzz(const uint8_t* data, size_t size) {
  const World& w = GetWorld();
  v1::GenerateRequest proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size)))
    return;  // the server answers INVALID_ARGUMENT
  StatusOr<SessionRequest> session = server::ToSessionRequest(proto);
  if (!session.ok()) return CheckRefusal(session.status(), "ToSessionRequest");
  const GenerateRequest& r = session.value().generate;
  const Status valid = w.factory->Validate(r);
  if (!valid.ok()) return CheckRefusal(valid, "Validate");
  StatusOr<std::vector<int32_t>> prompt = w.factory->BuildPrompt(r);
  if (!prompt.ok()) return CheckRefusal(prompt.status(), "BuildPrompt");
  const std::vector<int32_t>& ids = prompt.value();
  FUZZ_CHECK(!ids.empty(), "BuildPrompt accepted an empty prompt");
  for (int32_t id : ids) {
    FUZZ_CHECK(id >= 0 && id < w.config.vocab_size, "prompt id " + std::to_string(id));
  }
  if (!r.prompt_token_ids.empty()) FUZZ_CHECK(ids == r.prompt_token_ids, "token ids changed");
  if (r.dysco) {
    const bool chat = IsChatFormatted(r);
    StatusOr<DyscoParams> params =
        ResolveDyscoParams(w.config, r.dysco_overrides, chat, static_cast<int64_t>(ids.size()),
                           chat ? w.generation_prompt_tokens : -1);
    if (!params.ok()) return CheckRefusal(params.status(), "ResolveDyscoParams");
    const DyscoParams& p = params.value();
    FUZZ_CHECK(!p.selected_heads.empty() && (p.top_p || p.top_k), "unresolved DySCO parameters");
    FUZZ_CHECK(p.warmup_tokens() >= 1 && p.prefill_len() >= 1,
               "warm-up " + std::to_string(p.warmup_tokens()) + " for a prompt of " +
                   std::to_string(ids.size()) + " tokens");
  }
}

}  // namespace
}  // namespace dysco

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Protobuf logs every string field that is not UTF-8 (the parse then fails, as in the server).
  google::protobuf::SetLogHandler(nullptr);
  dysco::GetWorld();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    dysco::Fuzz(data, size);
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, std::string("exception: ") + e.what());
  }
  return 0;
}
