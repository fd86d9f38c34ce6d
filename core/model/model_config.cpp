#include "core/model/model_config.h"

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

namespace dysco {
namespace {

using nlohmann::json;

const char* JsonTypeName(const json& j) { return j.type_name(); }

// Reads fields of one JSON object, turning every problem into "<origin>: <field path> ..." errors.
class FieldReader {
 public:
  explicit FieldReader(const std::string& origin) : origin_(origin) {}

  Status Error(const std::string& field, const std::string& what) const {
    return InvalidArgumentError(origin_ + ": " + field + " " + what);
  }

  // Looks up `key` in `obj`; nullptr when absent.
  static const json* Find(const json& obj, const char* key) {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }

  Status Required(const json& obj, const std::string& prefix, const char* key,
                  const json** out) const {
    *out = Find(obj, key);
    if (*out == nullptr) return Error(prefix + key, "is missing");
    return OkStatus();
  }

  Status Int(const json& v, const std::string& field, int64_t lo, int64_t hi, int64_t* out) const {
    if (!v.is_number_integer()) {
      return Error(field, std::string("must be an integer, got ") + JsonTypeName(v));
    }
    int64_t x = 0;
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(field, "is out of range");
      }
      x = static_cast<int64_t>(u);
    } else {
      x = v.get<int64_t>();
    }
    if (x < lo || x > hi) {
      return Error(field, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                              "], got " + std::to_string(x));
    }
    *out = x;
    return OkStatus();
  }

  Status Double(const json& v, const std::string& field, double* out) const {
    if (!v.is_number())
      return Error(field, std::string("must be a number, got ") + JsonTypeName(v));
    *out = v.get<double>();
    if (!std::isfinite(*out)) return Error(field, "must be finite");
    return OkStatus();
  }

  Status Bool(const json& v, const std::string& field, bool* out) const {
    if (!v.is_boolean())
      return Error(field, std::string("must be a boolean, got ") + JsonTypeName(v));
    *out = v.get<bool>();
    return OkStatus();
  }

  Status String(const json& v, const std::string& field, std::string* out) const {
    if (!v.is_string())
      return Error(field, std::string("must be a string, got ") + JsonTypeName(v));
    *out = v.get<std::string>();
    return OkStatus();
  }

  Status Object(const json& v, const std::string& field) const {
    if (!v.is_object())
      return Error(field, std::string("must be an object, got ") + JsonTypeName(v));
    return OkStatus();
  }

  Status Array(const json& v, const std::string& field) const {
    if (!v.is_array()) return Error(field, std::string("must be an array, got ") + JsonTypeName(v));
    return OkStatus();
  }

  Status TokenId(const json& v, const std::string& field, int64_t vocab, int32_t* out) const {
    int64_t x = 0;
    DYSCO_RETURN_IF_ERROR(Int(v, field, 0, vocab - 1, &x));
    *out = static_cast<int32_t>(x);
    return OkStatus();
  }

  // Required positive integer at obj[key].
  Status PositiveInt(const json& obj, const char* key, int64_t hi, int64_t* out) const {
    const json* v;
    DYSCO_RETURN_IF_ERROR(Required(obj, "", key, &v));
    return Int(*v, key, 1, hi, out);
  }

 private:
  std::string origin_;
};

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

Status ParseSpecialTokens(const FieldReader& r, const json& root, int64_t vocab,
                          SpecialTokens* st) {
  const json* obj;
  DYSCO_RETURN_IF_ERROR(r.Required(root, "", "special_tokens", &obj));
  DYSCO_RETURN_IF_ERROR(r.Object(*obj, "special_tokens"));
  const json* v;
  if ((v = FieldReader::Find(*obj, "bos_token_id")) != nullptr && !v->is_null()) {
    int32_t id = 0;
    DYSCO_RETURN_IF_ERROR(r.TokenId(*v, "special_tokens.bos_token_id", vocab, &id));
    st->bos_token_id = id;
  }
  DYSCO_RETURN_IF_ERROR(r.Required(*obj, "special_tokens.", "eos_token_ids", &v));
  DYSCO_RETURN_IF_ERROR(r.Array(*v, "special_tokens.eos_token_ids"));
  for (size_t i = 0; i < v->size(); ++i) {
    int32_t id = 0;
    DYSCO_RETURN_IF_ERROR(
        r.TokenId((*v)[i], "special_tokens.eos_token_ids[" + std::to_string(i) + "]", vocab, &id));
    st->eos_token_ids.push_back(id);
  }
  if ((v = FieldReader::Find(*obj, "pad_token_id")) != nullptr && !v->is_null()) {
    int32_t id = 0;
    DYSCO_RETURN_IF_ERROR(r.TokenId(*v, "special_tokens.pad_token_id", vocab, &id));
    st->pad_token_id = id;
  }
  if ((v = FieldReader::Find(*obj, "add_bos")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Bool(*v, "special_tokens.add_bos", &st->add_bos));
  }
  if (st->add_bos && !st->bos_token_id) {
    return r.Error("special_tokens.add_bos", "is true but special_tokens.bos_token_id is null");
  }
  return OkStatus();
}

Status ParseChat(const FieldReader& r, const json& root, ModelConfig* c) {
  const json* v = FieldReader::Find(root, "chat_format");
  std::string format = "none";
  if (v != nullptr && !v->is_null()) DYSCO_RETURN_IF_ERROR(r.String(*v, "chat_format", &format));
  if (format == "chatml") {
    c->chat_format = ChatFormat::kChatml;
  } else if (format == "llama3") {
    c->chat_format = ChatFormat::kLlama3;
  } else if (format == "none") {
    c->chat_format = ChatFormat::kNone;
  } else {
    return r.Error("chat_format",
                   "must be \"chatml\", \"llama3\" or \"none\", got \"" + format + "\"");
  }
  const json* chat = FieldReader::Find(root, "chat");
  if (chat == nullptr || chat->is_null()) {
    if (c->chat_format != ChatFormat::kNone) {
      return r.Error("chat", "is missing (required when chat_format is not \"none\")");
    }
    return OkStatus();
  }
  DYSCO_RETURN_IF_ERROR(r.Object(*chat, "chat"));
  if ((v = FieldReader::Find(*chat, "default_system")) != nullptr && !v->is_null()) {
    std::string s;
    DYSCO_RETURN_IF_ERROR(r.String(*v, "chat.default_system", &s));
    c->chat.default_system = std::move(s);
  }
  if ((v = FieldReader::Find(*chat, "generation_prompt")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.String(*v, "chat.generation_prompt", &c->chat.generation_prompt));
  } else if (c->chat_format != ChatFormat::kNone) {
    return r.Error("chat.generation_prompt", "is missing");
  }
  if ((v = FieldReader::Find(*chat, "stop_strings")) != nullptr && !v->is_null()) {
    DYSCO_RETURN_IF_ERROR(r.Array(*v, "chat.stop_strings"));
    for (size_t i = 0; i < v->size(); ++i) {
      std::string s;
      const std::string field = "chat.stop_strings[" + std::to_string(i) + "]";
      DYSCO_RETURN_IF_ERROR(r.String((*v)[i], field, &s));
      if (s.empty()) return r.Error(field, "must not be empty");
      c->chat.stop_strings.push_back(std::move(s));
    }
  }
  return OkStatus();
}

Status ParseDysco(const FieldReader& r, const json& root, ModelConfig* c) {
  const json* obj = FieldReader::Find(root, "dysco");
  if (obj == nullptr || obj->is_null()) return OkStatus();
  DYSCO_RETURN_IF_ERROR(r.Object(*obj, "dysco"));
  DyscoDefaults& d = c->dysco;
  const json* v;
  if ((v = FieldReader::Find(*obj, "selected_heads")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Array(*v, "dysco.selected_heads"));
    for (size_t i = 0; i < v->size(); ++i) {
      const std::string field = "dysco.selected_heads[" + std::to_string(i) + "]";
      const json& pair = (*v)[i];
      if (!pair.is_array() || pair.size() != 2) {
        return r.Error(field, "must be a [layer, query_head] pair");
      }
      int64_t layer = 0, head = 0;
      DYSCO_RETURN_IF_ERROR(r.Int(pair[0], field + "[0] (layer)", 0, c->num_layers - 1, &layer));
      DYSCO_RETURN_IF_ERROR(
          r.Int(pair[1], field + "[1] (query head)", 0, c->num_attention_heads - 1, &head));
      d.selected_heads.emplace_back(static_cast<int>(layer), static_cast<int>(head));
    }
  }
  if ((v = FieldReader::Find(*obj, "top_p")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Double(*v, "dysco.top_p", &d.top_p));
    if (!(d.top_p > 0.0 && d.top_p <= 1.0)) return r.Error("dysco.top_p", "must be in (0, 1]");
  }
  int64_t x = 0;
  if ((v = FieldReader::Find(*obj, "top_k")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Int(*v, "dysco.top_k", 1, kMaxInt32, &x));
    d.top_k = static_cast<int>(x);
  }
  if ((v = FieldReader::Find(*obj, "strength")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Double(*v, "dysco.strength", &d.strength));
    if (!(d.strength > 0.0)) return r.Error("dysco.strength", "must be > 0");
  }
  if ((v = FieldReader::Find(*obj, "decay_factor")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Double(*v, "dysco.decay_factor", &d.decay_factor));
    if (!(d.decay_factor >= 0.0)) return r.Error("dysco.decay_factor", "must be >= 0");
  }
  if ((v = FieldReader::Find(*obj, "context_warmup_steps")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Int(*v, "dysco.context_warmup_steps", 0, kMaxInt32, &x));
    d.context_warmup_steps = static_cast<int>(x);
  }
  if ((v = FieldReader::Find(*obj, "intervention_warmup")) != nullptr && !v->is_null()) {
    if (v->is_string()) {
      if (v->get<std::string>() != "auto") {
        return r.Error("dysco.intervention_warmup", "must be \"auto\" or an integer >= 0");
      }
      d.intervention_warmup = -1;
    } else {
      DYSCO_RETURN_IF_ERROR(r.Int(*v, "dysco.intervention_warmup", 0, kMaxInt32, &x));
      d.intervention_warmup = static_cast<int>(x);
    }
  }
  if ((v = FieldReader::Find(*obj, "dynamic_rescale")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Bool(*v, "dysco.dynamic_rescale", &d.dynamic_rescale));
  }
  if ((v = FieldReader::Find(*obj, "template_sequences")) != nullptr && !v->is_null()) {
    DYSCO_RETURN_IF_ERROR(r.Array(*v, "dysco.template_sequences"));
    for (size_t i = 0; i < v->size(); ++i) {
      const std::string field = "dysco.template_sequences[" + std::to_string(i) + "]";
      const json& seq = (*v)[i];
      DYSCO_RETURN_IF_ERROR(r.Array(seq, field));
      if (seq.empty()) return r.Error(field, "must not be empty");
      std::vector<int32_t> ids;
      for (size_t k = 0; k < seq.size(); ++k) {
        int32_t id = 0;
        DYSCO_RETURN_IF_ERROR(
            r.TokenId(seq[k], field + "[" + std::to_string(k) + "]", c->vocab_size, &id));
        ids.push_back(id);
      }
      d.template_sequences.push_back(std::move(ids));
    }
  }
  return OkStatus();
}

}  // namespace

const char* ModelDtypeName(ModelDtype dtype) {
  switch (dtype) {
    case ModelDtype::kFloat32:
      return "float32";
    case ModelDtype::kBFloat16:
      return "bfloat16";
    case ModelDtype::kFloat16:
      return "float16";
  }
  return "unknown";
}

int ModelDtypeSize(ModelDtype dtype) { return dtype == ModelDtype::kFloat32 ? 4 : 2; }

constexpr int kMaxJsonDepth = 64;

StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& origin) {
  // Values nested deeper than any config needs are dropped while parsing and refused: a deep one
  // would overflow the stack where it is dumped or destroyed (found by probing the parser).
  bool too_deep = false;
  const json::parser_callback_t limit_depth = [&too_deep](int depth, json::parse_event_t, json&) {
    if (depth <= kMaxJsonDepth) return true;
    too_deep = true;
    return false;
  };
  json root = json::parse(json_text, limit_depth, /*allow_exceptions=*/false);
  if (too_deep) {
    return InvalidArgumentError(origin + ": nested deeper than " + std::to_string(kMaxJsonDepth) +
                                " levels");
  }
  if (root.is_discarded()) return InvalidArgumentError(origin + ": is not valid JSON");
  FieldReader r(origin);
  if (!root.is_object()) return InvalidArgumentError(origin + ": top level must be a JSON object");

  ModelConfig c;
  const json* v;
  int64_t x = 0;
  DYSCO_RETURN_IF_ERROR(r.Required(root, "", "format_version", &v));
  // Older formats cannot run here: 1 kept fp32 weights inside model.pt and its forward read
  // seq_lens / probe_heads on the host (not graph-capturable); 2 was the sync-free forward with the
  // weights still inside model.pt; 3 bound each parameter to one tensor (no fused q/k/v, gate/up).
  // All need a re-export (make model does it).
  if (v->is_number_integer() && v->get<int64_t>() >= 1 &&
      v->get<int64_t>() < kPackageFormatVersion) {
    return FailedPreconditionError(
        origin + ": format_version " + std::to_string(v->get<int64_t>()) +
        " is no longer supported (format " + std::to_string(kPackageFormatVersion) +
        ": weights in weights.safetensors, fused q/k/v and gate/up, a forward without host "
        "synchronisation); re-export the package");
  }
  DYSCO_RETURN_IF_ERROR(
      r.Int(*v, "format_version", kPackageFormatVersion, kPackageFormatVersion, &x));
  c.format_version = static_cast<int>(x);
  if ((v = FieldReader::Find(root, "weights")) != nullptr && !v->is_null()) {
    DYSCO_RETURN_IF_ERROR(r.String(*v, "weights", &c.weights_file));
    // A file of the package: no directories, so a package cannot point the loader elsewhere.
    if (c.weights_file.empty() || c.weights_file == "." || c.weights_file == ".." ||
        c.weights_file.find('/') != std::string::npos ||
        c.weights_file.find('\0') != std::string::npos) {
      return r.Error("weights",
                     "must be a file name inside the package, got \"" + c.weights_file + "\"");
    }
  }
  if ((v = FieldReader::Find(root, "model_name")) != nullptr && !v->is_null()) {
    DYSCO_RETURN_IF_ERROR(r.String(*v, "model_name", &c.model_name));
  }
  DYSCO_RETURN_IF_ERROR(r.Required(root, "", "architecture", &v));
  DYSCO_RETURN_IF_ERROR(r.String(*v, "architecture", &c.architecture));
  if (c.architecture != "llama" && c.architecture != "qwen3") {
    return r.Error("architecture",
                   "must be \"llama\" or \"qwen3\", got \"" + c.architecture + "\"");
  }
  std::string dtype;
  DYSCO_RETURN_IF_ERROR(r.Required(root, "", "dtype", &v));
  DYSCO_RETURN_IF_ERROR(r.String(*v, "dtype", &dtype));
  if (dtype == "float32") {
    c.dtype = ModelDtype::kFloat32;
  } else if (dtype == "bfloat16") {
    c.dtype = ModelDtype::kBFloat16;
  } else if (dtype == "float16") {
    c.dtype = ModelDtype::kFloat16;
  } else {
    return r.Error("dtype",
                   "must be \"float32\", \"bfloat16\" or \"float16\", got \"" + dtype + "\"");
  }

  DYSCO_RETURN_IF_ERROR(r.PositiveInt(root, "vocab_size", kMaxInt32, &c.vocab_size));
  DYSCO_RETURN_IF_ERROR(r.PositiveInt(root, "hidden_size", kMaxInt32, &c.hidden_size));
  DYSCO_RETURN_IF_ERROR(r.PositiveInt(root, "intermediate_size", kMaxInt32, &c.intermediate_size));
  DYSCO_RETURN_IF_ERROR(r.PositiveInt(root, "num_layers", 4096, &x));
  c.num_layers = static_cast<int>(x);
  DYSCO_RETURN_IF_ERROR(r.PositiveInt(root, "num_attention_heads", 4096, &x));
  c.num_attention_heads = static_cast<int>(x);
  DYSCO_RETURN_IF_ERROR(r.PositiveInt(root, "num_kv_heads", 4096, &x));
  c.num_kv_heads = static_cast<int>(x);
  if (c.num_attention_heads % c.num_kv_heads != 0) {
    return r.Error("num_kv_heads", "must divide num_attention_heads (" +
                                       std::to_string(c.num_attention_heads) + "), got " +
                                       std::to_string(c.num_kv_heads));
  }
  DYSCO_RETURN_IF_ERROR(r.PositiveInt(root, "head_dim", 4096, &x));
  c.head_dim = static_cast<int>(x);
  DYSCO_RETURN_IF_ERROR(r.Required(root, "", "rms_norm_eps", &v));
  DYSCO_RETURN_IF_ERROR(r.Double(*v, "rms_norm_eps", &c.rms_norm_eps));
  if (!(c.rms_norm_eps > 0.0)) return r.Error("rms_norm_eps", "must be > 0");
  DYSCO_RETURN_IF_ERROR(r.Required(root, "", "rope_theta", &v));
  DYSCO_RETURN_IF_ERROR(r.Double(*v, "rope_theta", &c.rope_theta));
  if (!(c.rope_theta > 0.0)) return r.Error("rope_theta", "must be > 0");
  if ((v = FieldReader::Find(root, "rope_scaling")) != nullptr && !v->is_null()) {
    DYSCO_RETURN_IF_ERROR(r.Object(*v, "rope_scaling"));
    c.rope_scaling_json = v->dump();
  }
  DYSCO_RETURN_IF_ERROR(
      r.PositiveInt(root, "max_position_embeddings", kMaxInt32, &c.max_position_embeddings));
  if ((v = FieldReader::Find(root, "tie_word_embeddings")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Bool(*v, "tie_word_embeddings", &c.tie_word_embeddings));
  }
  if ((v = FieldReader::Find(root, "qk_norm")) != nullptr) {
    DYSCO_RETURN_IF_ERROR(r.Bool(*v, "qk_norm", &c.qk_norm));
  }
  DYSCO_RETURN_IF_ERROR(ParseSpecialTokens(r, root, c.vocab_size, &c.special_tokens));
  DYSCO_RETURN_IF_ERROR(ParseChat(r, root, &c));
  DYSCO_RETURN_IF_ERROR(ParseDysco(r, root, &c));
  return c;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> PackageWeightShapes(
    const ModelConfig& c) {
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size, hd = c.head_dim;
  const int64_t q_rows = c.num_attention_heads * hd, kv_rows = c.num_kv_heads * hd;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
      {"model.embed_tokens.weight", {c.vocab_size, hidden}},
      {"model.norm.weight", {hidden}},
  };
  if (!c.tie_word_embeddings) shapes.push_back({"lm_head.weight", {c.vocab_size, hidden}});
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    shapes.push_back({p + "input_layernorm.weight", {hidden}});
    shapes.push_back({p + "post_attention_layernorm.weight", {hidden}});
    shapes.push_back({p + "self_attn.q_proj.weight", {q_rows, hidden}});
    shapes.push_back({p + "self_attn.k_proj.weight", {kv_rows, hidden}});
    shapes.push_back({p + "self_attn.v_proj.weight", {kv_rows, hidden}});
    shapes.push_back({p + "self_attn.o_proj.weight", {hidden, q_rows}});
    shapes.push_back({p + "mlp.gate_proj.weight", {inter, hidden}});
    shapes.push_back({p + "mlp.up_proj.weight", {inter, hidden}});
    shapes.push_back({p + "mlp.down_proj.weight", {hidden, inter}});
    if (c.qk_norm) {
      shapes.push_back({p + "self_attn.q_norm.weight", {hd}});
      shapes.push_back({p + "self_attn.k_norm.weight", {hd}});
    }
  }
  return shapes;
}

StatusOr<ModelConfig> LoadModelConfig(const std::string& package_dir) {
  const std::string path = package_dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError(path + ": cannot open (is " + package_dir + " a model package?)");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return DataLossError(path + ": read error");
  return ParseModelConfig(text.str(), path);
}

}  // namespace dysco
