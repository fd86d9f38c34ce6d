// Tests of chat formatting: exact strings, compared with the models' own chat templates rendered by
// hand (SmolLM2's GGUF tokenizer.chat_template, Qwen3's and Llama 3's Hugging Face templates).
#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "core/text/chat_format.h"

namespace dysco {
namespace {

ChatSettings SmolLm2Chat() {
  ChatSettings c;
  c.default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
  c.generation_prompt = "<|im_start|>assistant\n";
  return c;
}

ChatSettings Qwen3Chat() {
  ChatSettings c;  // Qwen3 inserts no default system message; non-thinking generation prompt
  c.generation_prompt = "<|im_start|>assistant\n<think>\n\n</think>\n\n";
  return c;
}

ChatSettings Llama3Chat() {
  ChatSettings c;
  c.generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return c;
}

// SmolLM2's GGUF template:
// {% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{
// '<|im_start|>system You are a helpful AI assistant named SmolLM, trained by Hugging
// Face<|im_end|> ' }}{% endif %}{{'<|im_start|>' + message['role'] + ' ' + message['content'] +
// '<|im_end|>' + '
// '}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
// ' }}{% endif %}
TEST(ChatFormatTest, SmolLm2InsertsDefaultSystem) {
  auto text =
      FormatChat(ChatFormat::kChatml, SmolLm2Chat(), {{"user", "What is the capital of France?"}});
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  EXPECT_EQ(*text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
            "<|im_start|>assistant\n");
}

TEST(ChatFormatTest, SmolLm2KeepsExplicitSystemAndMultiTurn) {
  auto text = FormatChat(ChatFormat::kChatml, SmolLm2Chat(),
                         {{"system", "Be brief."},
                          {"user", "Hi"},
                          {"assistant", "Hello!"},
                          {"user", "  spaces kept \n"}});
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  EXPECT_EQ(
      *text,
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n  spaces kept \n<|im_end|>\n"
      "<|im_start|>assistant\n");
}

TEST(ChatFormatTest, SmolLm2WithoutGenerationPrompt) {
  auto text = FormatChat(ChatFormat::kChatml, SmolLm2Chat(), {{"system", "S"}, {"user", "U"}},
                         /*add_generation_prompt=*/false);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
}

TEST(ChatFormatTest, Qwen3HasNoDefaultSystem) {
  auto text = FormatChat(ChatFormat::kChatml, Qwen3Chat(), {{"user", "Hello"}});
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text,
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  text = FormatChat(ChatFormat::kChatml, Qwen3Chat(), {{"system", "Sys"}, {"user", "Hello"}});
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text,
            "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

TEST(ChatFormatTest, Llama3) {
  auto text = FormatChat(ChatFormat::kLlama3, Llama3Chat(),
                         {{"system", "You are terse."}, {"user", " What is 2+2?\n"}});
  ASSERT_TRUE(text.ok()) << text.status().ToString();
  EXPECT_EQ(
      *text,
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

// Found by tests/fuzz/fuzz_chat_format (input kept in its corpus): the Llama 3 template's `| trim`
// is Python's str.strip(), which strips every Unicode whitespace character and U+001C..U+001F, not
// only ASCII's; the content span is the trimmed content.
TEST(ChatFormatTest, Llama3TrimsUnicodeWhitespaceLikeJinja) {
  // U+001F, U+00A0, U+3000, " Hi", U+00A0, "there ", U+2028, U+0085, U+001C, "\t"
  const std::string content = "\x1f\xc2\xa0\xe3\x80\x80 Hi\xc2\xa0there \xe2\x80\xa8\xc2\x85\x1c\t";
  auto prompt = RenderChat(ChatFormat::kLlama3, Llama3Chat(), {{"user", content}});
  ASSERT_TRUE(prompt.ok()) << prompt.status().ToString();
  const std::string head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n";
  EXPECT_EQ(prompt->text, head + "Hi\xc2\xa0there<|eot_id|>" + Llama3Chat().generation_prompt);
  ASSERT_EQ(prompt->content_spans.size(), 1u);
  EXPECT_EQ(prompt->content_spans[0], std::make_pair(head.size(), head.size() + 9));
  // Whitespace only (and a lone \x1d): nothing left, no span.
  prompt = RenderChat(ChatFormat::kLlama3, Llama3Chat(), {{"user", "\x1d\xe3\x80\x80"}});
  ASSERT_TRUE(prompt.ok()) << prompt.status().ToString();
  EXPECT_EQ(prompt->text, head + "<|eot_id|>" + Llama3Chat().generation_prompt);
  EXPECT_TRUE(prompt->content_spans.empty());
  // Not UTF-8: repaired first, then trimmed (U+FFFD is not whitespace).
  prompt = RenderChat(ChatFormat::kLlama3, Llama3Chat(), {{"user", " \xff "}});
  ASSERT_TRUE(prompt.ok()) << prompt.status().ToString();
  EXPECT_EQ(prompt->text, head + "\xef\xbf\xbd<|eot_id|>" + Llama3Chat().generation_prompt);
}

TEST(ChatFormatTest, UnknownRoleNamesTheMessage) {
  auto text = FormatChat(ChatFormat::kChatml, SmolLm2Chat(),
                         {{"user", "a"}, {"assistant", "b"}, {"robot", "c"}});
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(text.status().message().find("messages[2].role"), std::string::npos)
      << text.status().message();
  EXPECT_NE(text.status().message().find("robot"), std::string::npos);
}

TEST(ChatFormatTest, EmptyMessagesAndNoFormat) {
  auto text = FormatChat(ChatFormat::kChatml, SmolLm2Chat(), {});
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), StatusCode::kInvalidArgument);
  text = FormatChat(ChatFormat::kNone, ChatSettings{}, {{"user", "x"}});
  ASSERT_FALSE(text.ok());
  EXPECT_EQ(text.status().code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace dysco
