// libFuzzer target: the model-package config parser, ParseModelConfig(json_text, origin)
// (core/model/model_config.h), on arbitrary text (seeds: the exported packages' config.json).
//
// Invariants: no exception escapes; an error is INVALID_ARGUMENT and its message starts with the
// origin; an accepted config is in the documented ranges (positive sizes, heads that divide, token
// ids inside the vocabulary, DySCO defaults in range).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "core/model/model_config.h"
#include "tests/fuzz/fuzz_check.h"

namespace dysco {
namespace {

const char kOrigin[] = "fuzz/config.json";

bool InVocab(int64_t id, const ModelConfig& c) { return id >= 0 && id < c.vocab_size; }

void CheckConfig(const ModelConfig& c) {
  FUZZ_CHECK(c.format_version == kPackageFormatVersion, "format_version");
  FUZZ_CHECK(!c.weights_file.empty() && c.weights_file.find('/') == std::string::npos &&
                 c.weights_file != "." && c.weights_file != "..",
             "weights: " + c.weights_file);
  FUZZ_CHECK(c.architecture == "llama" || c.architecture == "qwen3", c.architecture);
  FUZZ_CHECK(c.vocab_size > 0 && c.hidden_size > 0 && c.intermediate_size > 0 && c.num_layers > 0 &&
                 c.num_attention_heads > 0 && c.num_kv_heads > 0 && c.head_dim > 0 &&
                 c.max_position_embeddings > 0,
             "a size is not positive");
  FUZZ_CHECK(c.num_attention_heads % c.num_kv_heads == 0, "kv heads do not divide");
  FUZZ_CHECK(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0, "rms_norm_eps");
  FUZZ_CHECK(std::isfinite(c.rope_theta) && c.rope_theta > 0, "rope_theta");
  const SpecialTokens& st = c.special_tokens;
  FUZZ_CHECK(!st.bos_token_id || InVocab(*st.bos_token_id, c), "bos_token_id");
  FUZZ_CHECK(!st.pad_token_id || InVocab(*st.pad_token_id, c), "pad_token_id");
  for (int32_t id : st.eos_token_ids) FUZZ_CHECK(InVocab(id, c), "eos id " + std::to_string(id));
  FUZZ_CHECK(!st.add_bos || st.bos_token_id, "add_bos without bos");
  for (const std::string& s : c.chat.stop_strings) FUZZ_CHECK(!s.empty(), "empty chat stop string");
  const DyscoDefaults& d = c.dysco;
  for (const auto& [layer, head] : d.selected_heads) {
    FUZZ_CHECK(layer >= 0 && layer < c.num_layers && head >= 0 && head < c.num_attention_heads,
               "head " + std::to_string(layer) + ":" + std::to_string(head));
  }
  FUZZ_CHECK(d.top_p > 0 && d.top_p <= 1, "dysco.top_p");
  FUZZ_CHECK(d.top_k >= 1, "dysco.top_k");
  FUZZ_CHECK(std::isfinite(d.strength) && d.strength > 0, "dysco.strength");
  FUZZ_CHECK(std::isfinite(d.decay_factor) && d.decay_factor >= 0, "dysco.decay_factor");
  FUZZ_CHECK(d.context_warmup_steps >= 0 && d.intervention_warmup >= -1, "dysco warm-ups");
  for (const auto& seq : d.template_sequences) {
    FUZZ_CHECK(!seq.empty(), "empty template sequence");
    for (int32_t id : seq) FUZZ_CHECK(InVocab(id, c), "template id " + std::to_string(id));
  }
}

}  // namespace
}  // namespace dysco

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    dysco::StatusOr<dysco::ModelConfig> c = dysco::ParseModelConfig(text, dysco::kOrigin);
    if (c.ok()) {
      dysco::CheckConfig(c.value());
    } else {
      // INVALID_ARGUMENT for a bad config; FAILED_PRECONDITION only for an older package format
      // (format_version 1 to 3: "re-export the package").
      const bool old_format =
          c.status().code() == dysco::StatusCode::kFailedPrecondition &&
          c.status().message().find("re-export the package") != std::string::npos;
      FUZZ_CHECK(c.status().code() == dysco::StatusCode::kInvalidArgument || old_format,
                 c.status().ToString());
      FUZZ_CHECK(c.status().message().rfind(std::string(dysco::kOrigin) + ": ", 0) == 0,
                 c.status().ToString());
    }
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, std::string("exception: ") + e.what());
  }
  return 0;
}
