// Tests of config.json parsing: a valid package config round-trips, and every kind of mistake gives
// an INVALID_ARGUMENT / NOT_FOUND that names the file and the field.
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/model/model_config.h"
#include "tests/cpp/temp_dir.h"

namespace dysco {
namespace {

using nlohmann::json;

json ValidConfig() {
  return json::parse(R"({
    "format_version": 4,
    "weights": "weights.safetensors",
    "model_name": "SmolLM2-135M-Instruct",
    "architecture": "llama",
    "dtype": "float32",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_layers": 30,
    "num_attention_heads": 9,
    "num_kv_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "rope_scaling": null,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": true,
    "qk_norm": false,
    "special_tokens": {"bos_token_id": 1, "eos_token_ids": [2], "pad_token_id": 2, "add_bos": false},
    "chat_format": "chatml",
    "chat": {
      "default_system": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
      "generation_prompt": "<|im_start|>assistant\n",
      "stop_strings": []
    },
    "dysco": {
      "selected_heads": [[12, 3], [14, 0]],
      "top_p": 0.975,
      "top_k": 4096,
      "strength": 2.0,
      "decay_factor": 0.75,
      "context_warmup_steps": 8,
      "intervention_warmup": "auto",
      "dynamic_rescale": true,
      "template_sequences": [[1, 9690, 198]]
    },
    "source": {"kind": "gguf", "path": "x.gguf", "sha256": "00"}
  })");
}

class ModelConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir(std::string("dysco_test_model_config_") +
                       ::testing::UnitTest::GetInstance()->current_test_info()->name() + "_");
    ASSERT_FALSE(dir_.empty()) << "mkdtemp failed";
  }
  void TearDown() override {
    if (!dir_.empty()) {
      EXPECT_TRUE(RemoveTree(dir_)) << dir_;
    }
  }

  StatusOr<ModelConfig> LoadText(const std::string& text) {
    std::ofstream(dir_ + "/config.json") << text;
    return LoadModelConfig(dir_);
  }
  StatusOr<ModelConfig> Load(const json& j) { return LoadText(j.dump()); }

  // Expects INVALID_ARGUMENT whose message names the file and contains `needle`.
  void ExpectError(const json& j, const std::string& needle) {
    auto c = Load(j);
    ASSERT_FALSE(c.ok()) << "expected an error mentioning " << needle;
    EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status().ToString();
    EXPECT_NE(c.status().message().find(dir_ + "/config.json"), std::string::npos)
        << c.status().message();
    EXPECT_NE(c.status().message().find(needle), std::string::npos) << c.status().message();
  }

  std::string dir_;
};

TEST_F(ModelConfigTest, ParsesValidConfig) {
  auto c = Load(ValidConfig());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->format_version, 4);
  EXPECT_EQ(c->weights_file, "weights.safetensors");
  EXPECT_EQ(c->model_name, "SmolLM2-135M-Instruct");
  EXPECT_EQ(c->architecture, "llama");
  EXPECT_EQ(c->dtype, ModelDtype::kFloat32);
  EXPECT_EQ(c->vocab_size, 49152);
  EXPECT_EQ(c->hidden_size, 576);
  EXPECT_EQ(c->intermediate_size, 1536);
  EXPECT_EQ(c->num_layers, 30);
  EXPECT_EQ(c->num_attention_heads, 9);
  EXPECT_EQ(c->num_kv_heads, 3);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c->rope_theta, 100000.0);
  EXPECT_TRUE(c->rope_scaling_json.empty());
  EXPECT_EQ(c->max_position_embeddings, 8192);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_FALSE(c->qk_norm);
  ASSERT_TRUE(c->special_tokens.bos_token_id.has_value());
  EXPECT_EQ(*c->special_tokens.bos_token_id, 1);
  EXPECT_EQ(c->special_tokens.eos_token_ids, std::vector<int32_t>({2}));
  EXPECT_EQ(c->special_tokens.pad_token_id.value_or(-1), 2);
  EXPECT_FALSE(c->special_tokens.add_bos);
  EXPECT_EQ(c->chat_format, ChatFormat::kChatml);
  EXPECT_EQ(c->chat.default_system.value_or(""),
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  EXPECT_EQ(c->chat.generation_prompt, "<|im_start|>assistant\n");
  EXPECT_TRUE(c->chat.stop_strings.empty());
  const DyscoDefaults& d = c->dysco;
  ASSERT_EQ(d.selected_heads.size(), 2u);
  EXPECT_EQ(d.selected_heads[0], std::make_pair(12, 3));
  EXPECT_EQ(d.selected_heads[1], std::make_pair(14, 0));
  EXPECT_DOUBLE_EQ(d.top_p, 0.975);
  EXPECT_EQ(d.top_k, 4096);
  EXPECT_DOUBLE_EQ(d.strength, 2.0);
  EXPECT_DOUBLE_EQ(d.decay_factor, 0.75);
  EXPECT_EQ(d.context_warmup_steps, 8);
  EXPECT_EQ(d.intervention_warmup, -1);
  EXPECT_TRUE(d.dynamic_rescale);
  ASSERT_EQ(d.template_sequences.size(), 1u);
  EXPECT_EQ(d.template_sequences[0], std::vector<int32_t>({1, 9690, 198}));
}

TEST_F(ModelConfigTest, OptionalFieldsAndVariants) {
  json j = ValidConfig();
  j["dtype"] = "bfloat16";
  j["architecture"] = "qwen3";
  j["qk_norm"] = true;
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  j["special_tokens"]["bos_token_id"] = nullptr;
  j["special_tokens"]["eos_token_ids"] = {2, 0};
  j["chat"]["default_system"] = nullptr;
  j["chat"]["stop_strings"] = {"</s>"};
  j["dysco"]["intervention_warmup"] = 7;
  j["dysco"].erase("top_k");
  auto c = Load(j);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->dtype, ModelDtype::kBFloat16);
  EXPECT_EQ(ModelDtypeSize(c->dtype), 2);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_NE(c->rope_scaling_json.find("yarn"), std::string::npos);
  EXPECT_FALSE(c->special_tokens.bos_token_id.has_value());
  EXPECT_EQ(c->special_tokens.eos_token_ids, std::vector<int32_t>({2, 0}));
  EXPECT_FALSE(c->chat.default_system.has_value());
  EXPECT_EQ(c->chat.stop_strings, std::vector<std::string>({"</s>"}));
  EXPECT_EQ(c->dysco.intervention_warmup, 7);
  EXPECT_EQ(c->dysco.top_k, 4096);  // reference default

  j.erase("dysco");
  j["chat_format"] = "none";
  j.erase("chat");
  c = Load(j);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->chat_format, ChatFormat::kNone);
  EXPECT_TRUE(c->dysco.selected_heads.empty());
}

TEST_F(ModelConfigTest, MissingFile) {
  auto c = LoadModelConfig(dir_ + "/nope");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kNotFound);
  EXPECT_NE(c.status().message().find("nope/config.json"), std::string::npos);
}

TEST_F(ModelConfigTest, NotJson) {
  auto c = LoadText("{ \"format_version\": 4, ");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("not valid JSON"), std::string::npos);
  c = LoadText("[1, 2]");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(ModelConfigTest, MissingFields) {
  for (const char* field :
       {"format_version", "architecture", "dtype", "vocab_size", "hidden_size", "intermediate_size",
        "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "rms_norm_eps",
        "rope_theta", "max_position_embeddings", "special_tokens"}) {
    json j = ValidConfig();
    j.erase(field);
    ExpectError(j, std::string(field) + " is missing");
  }
  json j = ValidConfig();
  j["special_tokens"].erase("eos_token_ids");
  ExpectError(j, "special_tokens.eos_token_ids is missing");
  j = ValidConfig();
  j.erase("chat");
  ExpectError(j, "chat is missing");
  j = ValidConfig();
  j["chat"].erase("generation_prompt");
  ExpectError(j, "chat.generation_prompt is missing");
}

TEST_F(ModelConfigTest, WrongTypes) {
  json j = ValidConfig();
  j["num_layers"] = "30";
  ExpectError(j, "num_layers must be an integer, got string");
  j = ValidConfig();
  j["vocab_size"] = 49152.5;
  ExpectError(j, "vocab_size must be an integer");
  j = ValidConfig();
  j["rope_theta"] = "big";
  ExpectError(j, "rope_theta must be a number");
  j = ValidConfig();
  j["tie_word_embeddings"] = 1;
  ExpectError(j, "tie_word_embeddings must be a boolean");
  j = ValidConfig();
  j["special_tokens"]["eos_token_ids"] = 2;
  ExpectError(j, "special_tokens.eos_token_ids must be an array");
  j = ValidConfig();
  j["dysco"]["selected_heads"] = {{12, 3}, {14}};
  ExpectError(j, "dysco.selected_heads[1] must be a [layer, query_head] pair");
  j = ValidConfig();
  j["dysco"]["dynamic_rescale"] = "yes";
  ExpectError(j, "dysco.dynamic_rescale must be a boolean");
  j = ValidConfig();
  j["dysco"]["intervention_warmup"] = "sometimes";
  ExpectError(j, "dysco.intervention_warmup must be \"auto\" or an integer");
  j = ValidConfig();
  j["chat"]["default_system"] = 3;
  ExpectError(j, "chat.default_system must be a string");
}

TEST_F(ModelConfigTest, OutOfRangeValues) {
  json j = ValidConfig();
  j["dysco"]["selected_heads"] = {{12, 3}, {14, 9}};  // 9 query heads: 0..8
  ExpectError(j, "dysco.selected_heads[1][1] (query head) must be in [0, 8], got 9");
  j = ValidConfig();
  j["dysco"]["selected_heads"] = {{30, 0}};
  ExpectError(j, "dysco.selected_heads[0][0] (layer) must be in [0, 29], got 30");
  j = ValidConfig();
  j["dysco"]["selected_heads"] = {{-1, 0}};
  ExpectError(j, "dysco.selected_heads[0][0] (layer)");
  j = ValidConfig();
  j["num_layers"] = 0;
  ExpectError(j, "num_layers must be in [1,");
  j = ValidConfig();
  j["num_kv_heads"] = 4;
  ExpectError(j, "num_kv_heads must divide num_attention_heads (9), got 4");
  j = ValidConfig();
  j["format_version"] = 5;
  ExpectError(j, "format_version must be in [4, 4], got 5");
  for (int old_version : {1, 2, 3}) {
    j = ValidConfig();
    j["format_version"] = old_version;
    auto old = ParseModelConfig(j.dump(), "config.json");
    ASSERT_FALSE(old.ok());
    EXPECT_EQ(old.status().code(), StatusCode::kFailedPrecondition);
    EXPECT_NE(old.status().message().find("re-export the package"), std::string::npos);
  }
  for (const char* bad : {"../w.safetensors", "a/b", "", ".."}) {
    j = ValidConfig();
    j["weights"] = bad;
    ExpectError(j, "weights must be a file name inside the package");
  }
  j = ValidConfig();
  j["dtype"] = "int8";
  ExpectError(j, "dtype must be");
  j = ValidConfig();
  j["architecture"] = "gpt2";
  ExpectError(j, "architecture must be");
  j = ValidConfig();
  j["chat_format"] = "alpaca";
  ExpectError(j, "chat_format must be");
  j = ValidConfig();
  j["special_tokens"]["eos_token_ids"] = {2, 49152};
  ExpectError(j, "special_tokens.eos_token_ids[1] must be in [0, 49151], got 49152");
  j = ValidConfig();
  j["special_tokens"]["bos_token_id"] = nullptr;
  j["special_tokens"]["add_bos"] = true;
  ExpectError(j, "special_tokens.add_bos is true but special_tokens.bos_token_id is null");
  j = ValidConfig();
  j["dysco"]["top_p"] = 1.5;
  ExpectError(j, "dysco.top_p must be in (0, 1]");
  j = ValidConfig();
  j["dysco"]["strength"] = 0;
  ExpectError(j, "dysco.strength must be > 0");
  j = ValidConfig();
  j["dysco"]["top_k"] = 0;
  ExpectError(j, "dysco.top_k must be in [1,");
  j = ValidConfig();
  j["dysco"]["template_sequences"] = {json::array({1, 2}), json::array()};
  ExpectError(j, "dysco.template_sequences[1] must not be empty");
  j = ValidConfig();
  j["dysco"]["template_sequences"] = {{1, -2}};
  ExpectError(j, "dysco.template_sequences[0][1] must be in [0, 49151], got -2");
  j = ValidConfig();
  j["rms_norm_eps"] = 0.0;
  ExpectError(j, "rms_norm_eps must be > 0");
}

// The tensors a package's weights file must hold: the exporter's required_weights.
TEST_F(ModelConfigTest, PackageWeightShapes) {
  auto c = Load(ValidConfig());
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  auto shapes = PackageWeightShapes(*c);
  ASSERT_EQ(shapes.size(), 2u + 9u * 30u);  // tied: no lm_head; no q/k norm
  EXPECT_EQ(shapes[0].first, "model.embed_tokens.weight");
  EXPECT_EQ(shapes[0].second, (std::vector<int64_t>{49152, 576}));
  EXPECT_EQ(shapes[4].first, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(shapes[4].second, (std::vector<int64_t>{576, 576}));
  EXPECT_EQ(shapes[5].second, (std::vector<int64_t>{192, 576}));  // k_proj: 3 kv heads x 64
  EXPECT_EQ(shapes[10].first, "model.layers.0.mlp.down_proj.weight");
  EXPECT_EQ(shapes[10].second, (std::vector<int64_t>{576, 1536}));
  c->tie_word_embeddings = false;
  c->qk_norm = true;
  shapes = PackageWeightShapes(*c);
  ASSERT_EQ(shapes.size(), 3u + 11u * 30u);
  EXPECT_EQ(shapes[2].first, "lm_head.weight");
  EXPECT_EQ(shapes.back().first, "model.layers.29.self_attn.k_norm.weight");
  EXPECT_EQ(shapes.back().second, (std::vector<int64_t>{64}));
}

}  // namespace
// A config.json nested 50,000 levels deep (in an unknown field) is refused, not a stack overflow.
TEST(ModelConfigParseTest, DeeplyNestedJsonIsRefused) {
  const std::string deep = std::string(50000, '[') + std::string(50000, ']');
  const auto c =
      ParseModelConfig("{\"format_version\": 4, \"rope_scaling\": " + deep + "}", "x.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("nested deeper than"), std::string::npos)
      << c.status().message();
}

}  // namespace dysco
