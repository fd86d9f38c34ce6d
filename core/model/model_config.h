// ModelConfig: the architecture, special tokens, chat format and DySCO defaults of a model package,
// parsed from its config.json (schema in docs/model-interface.md). Everything else in core/ sizes
// itself from this.
//
// Thread-safety: plain value type; a const ModelConfig may be shared by any number of threads.
// Ownership: LoadModelConfig returns a value owned by the caller; on failure nothing is returned
// and the Status names the file and the offending field.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/base/status.h"
#include "core/text/chat_format.h"

namespace dysco {

// Dtype of the weights and of the KV cache.
enum class ModelDtype { kFloat32, kBFloat16, kFloat16 };
const char* ModelDtypeName(ModelDtype dtype);
int ModelDtypeSize(ModelDtype dtype);  // bytes per element

struct SpecialTokens {
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;  // generation stops on any of these
  std::optional<int32_t> pad_token_id;
  bool add_bos = false;  // prepend bos when encoding a (non-chat) prompt
};

// Defaults of the DySCO decoding method (docs/dysco.md). Every field has the
// reference default when the package omits it; selected_heads defaults to none (DySCO unavailable
// for that model).
struct DyscoDefaults {
  std::vector<std::pair<int, int>> selected_heads;  // (layer, QUERY head)
  double top_p = 0.975;
  int top_k = 4096;
  double strength = 2.0;
  double decay_factor = 0.75;
  int context_warmup_steps = 8;
  int intervention_warmup = -1;  // -1 = "auto": the length of the chat template's generation prompt
  bool dynamic_rescale = true;
  std::vector<std::vector<int32_t>> template_sequences;  // token-id sequences never selected
};

// The package format this code loads (docs/model-interface.md): 4 = weights in a safetensors file
// bound at load, some parameters to concatenations of tensors (fused q/k/v and gate/up), and a
// forward without host synchronisation. The parser refuses older formats with FAILED_PRECONDITION
// ("re-export the package"); ModelRunner::Load checks again.
constexpr int kPackageFormatVersion = 4;

struct ModelConfig {
  int format_version = kPackageFormatVersion;
  std::string model_name;
  std::string architecture;  // "llama" | "qwen3"
  ModelDtype dtype = ModelDtype::kFloat32;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int num_layers = 0;
  int num_attention_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::string rope_scaling_json;  // the raw "rope_scaling" object, empty when null
  int64_t max_position_embeddings = 0;
  bool tie_word_embeddings = false;
  bool qk_norm = false;
  SpecialTokens special_tokens;
  ChatFormat chat_format = ChatFormat::kNone;
  ChatSettings chat;
  DyscoDefaults dysco;
  // The package's weights file ("weights"): a plain file name inside the package directory.
  std::string weights_file = "weights.safetensors";
};

// Every tensor the package's weights file must hold (Hugging Face names), with the shape the config
// implies, in the exporter's order (tools/dysco_export/model.py required_weights). The dtype of
// every one is config.dtype.
std::vector<std::pair<std::string, std::vector<int64_t>>> PackageWeightShapes(const ModelConfig& c);

// Parses `json_text`; `origin` names the file in error messages.
StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& origin);
// Reads `package_dir`/config.json. NOT_FOUND when the file is missing, INVALID_ARGUMENT naming
// "<path>: <field>" for a missing field, a wrong type or an out-of-range value.
StatusOr<ModelConfig> LoadModelConfig(const std::string& package_dir);

}  // namespace dysco
