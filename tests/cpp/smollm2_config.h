// SmolLM2-135M-Instruct's model shape and chat settings written out in code, for the model-free
// tests and fuzz targets that need a ModelConfig without loading a package
// (tests/cpp/test_request.cpp, tests/cpp/test_tokenizer.cpp, tests/fuzz/fuzz_request.cpp). Values
// as in the exported package's config.json; the DySCO heads are two arbitrary ones in range.
//
// Thread-safety: pure functions returning values.
#pragma once

#include "core/model/model_config.h"
#include "core/text/chat_format.h"

namespace dysco {

inline ChatSettings SmolLm2Chat() {
  ChatSettings c;
  c.default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
  c.generation_prompt = "<|im_start|>assistant\n";
  return c;
}

inline ModelConfig SmolLm2Config() {
  ModelConfig c;
  c.model_name = "SmolLM2-135M-Instruct (test)";
  c.architecture = "llama";
  c.dtype = ModelDtype::kFloat32;
  c.vocab_size = 49152;
  c.hidden_size = 576;
  c.intermediate_size = 1536;
  c.num_layers = 30;
  c.num_attention_heads = 9;
  c.num_kv_heads = 3;
  c.head_dim = 64;
  c.max_position_embeddings = 8192;
  c.tie_word_embeddings = true;
  c.special_tokens.bos_token_id = 1;
  c.special_tokens.eos_token_ids = {2};
  c.special_tokens.pad_token_id = 2;
  c.special_tokens.add_bos = false;
  c.chat_format = ChatFormat::kChatml;
  c.chat = SmolLm2Chat();
  c.dysco.selected_heads = {{12, 3}, {14, 0}};
  c.dysco.template_sequences = {{1, 9690, 198}};
  return c;
}

}  // namespace dysco
