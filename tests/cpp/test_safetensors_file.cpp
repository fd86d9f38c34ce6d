// Tests of core/model/safetensors_file: the header parser on valid files and on each kind of
// malformed header (precise INVALID_ARGUMENT naming the tensor, never a crash), and the read-only
// mapping of a file (SafetensorsFile::Open).
#include "core/model/safetensors_file.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tests/cpp/temp_dir.h"

namespace dysco {
namespace {

using json = nlohmann::json;

// A safetensors file: 8-byte little-endian header length, the header (padded with spaces so that
// the data starts `align`-aligned), then `data`.
std::vector<uint8_t> MakeFile(const json& header, const std::vector<uint8_t>& data,
                              size_t align = 64) {
  std::string text = header.dump();
  while ((8 + text.size()) % align != 0) text += ' ';
  const uint64_t n = text.size();
  std::string bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  bytes += text;
  bytes.append(reinterpret_cast<const char*>(data.data()), data.size());
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

json Entry(const std::string& dtype, std::vector<int64_t> shape, uint64_t begin, uint64_t end) {
  return json{{"dtype", dtype}, {"shape", shape}, {"data_offsets", {begin, end}}};
}

// Two aligned F32 tensors: "a" [2, 8] at 0..64 and "b" [16] at 64..128.
json GoodHeader() {
  return json{{"__metadata__", {{"format", "pt"}}},
              {"a", Entry("F32", {2, 8}, 0, 64)},
              {"b", Entry("F32", {16}, 64, 128)}};
}

StatusOr<SafetensorsHeader> Parse(const std::vector<uint8_t>& file, uint64_t align = 64) {
  return ParseSafetensorsHeader(file.data(), file.size(), "w.safetensors", align);
}

void ExpectInvalid(const std::vector<uint8_t>& file, const std::string& needle,
                   uint64_t align = 64) {
  auto r = Parse(file, align);
  ASSERT_FALSE(r.ok()) << needle;
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().ToString();
  EXPECT_EQ(r.status().message().rfind("w.safetensors: ", 0), 0u) << r.status().message();
  EXPECT_NE(r.status().message().find(needle), std::string::npos)
      << "expected \"" << needle << "\" in: " << r.status().message();
}

TEST(SafetensorsHeaderTest, ParsesAlignedTensors) {
  const std::vector<uint8_t> file = MakeFile(GoodHeader(), std::vector<uint8_t>(128, 7));
  auto r = Parse(file);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->entries.size(), 2u);
  EXPECT_EQ(r->data_start % 64, 0u);
  EXPECT_EQ(r->entries[0].name, "a");
  EXPECT_EQ(r->entries[0].shape, (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(r->entries[0].offset, r->data_start);
  EXPECT_EQ(r->entries[0].item_size, 4);
  EXPECT_EQ(r->entries[1].name, "b");
  EXPECT_EQ(r->entries[1].offset, r->data_start + 64);
  EXPECT_EQ(r->entries[1].size, 64u);
}

TEST(SafetensorsHeaderTest, EmptyTensorsAndScalars) {
  json h{{"e", Entry("BF16", {0, 1ll << 40}, 0, 0)}, {"s", Entry("F32", {}, 0, 4)}};
  auto r = Parse(MakeFile(h, std::vector<uint8_t>(4)), 1);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->entries.size(), 2u);
}

TEST(SafetensorsHeaderTest, TruncatedOrBadLength) {
  ExpectInvalid({1, 2, 3}, "no header length");
  std::vector<uint8_t> file = MakeFile(GoodHeader(), std::vector<uint8_t>(128));
  ExpectInvalid(std::vector<uint8_t>(file.begin(), file.begin() + 20),
                "truncated safetensors file");
  // The last tensor's bytes cut short.
  file.resize(file.size() - 1);
  ExpectInvalid(file, "tensor 'b': data_offsets end at 128, past the 127 bytes");
  std::vector<uint8_t> huge(8, 0);
  huge[7] = 0x10;  // 2**60-byte header
  ExpectInvalid(huge, "over the");
}

TEST(SafetensorsHeaderTest, NotJsonOrNotAnObject) {
  std::vector<uint8_t> file = MakeFile(GoodHeader(), std::vector<uint8_t>(128));
  file[8] = '[';
  ExpectInvalid(file, "header is not a JSON object");
  ExpectInvalid(MakeFile(json::array({1, 2}), {}), "header is not a JSON object");
  ExpectInvalid(MakeFile(json{{"__metadata__", 3}}, {}), "__metadata__ is not a JSON object");
  std::string deep(200, '[');
  ExpectInvalid(MakeFile(json::parse("{\"x\": " + deep + std::string(200, ']') + "}"), {}),
                "nested too deeply");
}

TEST(SafetensorsHeaderTest, BadEntries) {
  auto with = [](const std::string& name, const json& entry) {
    json h = GoodHeader();
    h[name] = entry;
    return MakeFile(h, std::vector<uint8_t>(128));
  };
  ExpectInvalid(with("c", 5), "tensor 'c': header entry is not an object");
  ExpectInvalid(with("c", json{{"shape", {1}}, {"data_offsets", {0, 0}}}),
                "tensor 'c': no \"dtype\"");
  ExpectInvalid(with("c", Entry("Q4", {1}, 0, 1)), "tensor 'c': unknown dtype \"Q4\"");
  ExpectInvalid(with("c", json{{"dtype", "F32"}, {"shape", {-1}}, {"data_offsets", {0, 0}}}),
                "tensor 'c': \"shape\" has an entry that is not a count");
  ExpectInvalid(with("c", json{{"dtype", "F32"}, {"shape", {1.5}}, {"data_offsets", {0, 0}}}),
                "not a count");
  ExpectInvalid(with("c", json{{"dtype", "F32"}, {"shape", "x"}, {"data_offsets", {0, 0}}}),
                "tensor 'c': \"shape\" is not an array");
  ExpectInvalid(with("c", Entry("F32", {1, 1, 1, 1, 1, 1, 1, 1, 1}, 0, 4)), "at most 8");
  ExpectInvalid(with("c", json{{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0}}}),
                "tensor 'c': \"data_offsets\" is not [begin, end]");
  ExpectInvalid(with("c", Entry("F32", {1}, 8, 4)), "tensor 'c': data_offsets [8, 4] end before");
  // Shape x item size against the byte length, and products past int64.
  ExpectInvalid(with("a", Entry("F32", {2, 4}, 0, 64)),
                "tensor 'a': data_offsets [0, 64] hold 64 "
                "bytes, its shape and dtype F32 need 32");
  ExpectInvalid(with("c", Entry("F32", {1ll << 40, 1ll << 40}, 0, 0)),
                "tensor 'c': shape too large");
  ExpectInvalid(with("c", Entry("F16", {0, (1ll << 62) + 1}, 0, 0)), "tensor 'c': shape too large");
  // Offsets past the data (a corrupt header, or a truncated file).
  ExpectInvalid(with("c", Entry("U8", {4}, 1ull << 62, (1ull << 62) + 4)),
                "tensor 'c': data_offsets end at");
  ExpectInvalid(with("c", Entry("U8", {4}, 18446744073709551611ull, 18446744073709551615ull)),
                "tensor 'c': data_offsets end at");
}

TEST(SafetensorsHeaderTest, OverlapAndAlignment) {
  json h = GoodHeader();
  h["b"] = Entry("F32", {16}, 32, 96);
  ExpectInvalid(MakeFile(h, std::vector<uint8_t>(128)), "tensors 'a' and 'b' overlap", 4);
  h = GoodHeader();
  h["a"] = Entry("F32", {8}, 0, 32);
  h["c"] = Entry("F32", {8}, 32, 64);
  ExpectInvalid(MakeFile(h, std::vector<uint8_t>(128)), "tensor 'c': data at file offset", 64);
  EXPECT_TRUE(Parse(MakeFile(h, std::vector<uint8_t>(128)), 4).ok());
  // Item-size alignment holds whatever is asked: an F32 at an odd offset.
  h = json{{"p", Entry("U8", {1}, 0, 1)}, {"f", Entry("F32", {1}, 1, 5)}};
  ExpectInvalid(MakeFile(h, std::vector<uint8_t>(5)), "tensor 'f': data at file offset", 1);
  EXPECT_FALSE(Parse(MakeFile(GoodHeader(), std::vector<uint8_t>(128)), 3).ok());
}

TEST(SafetensorsFileTest, MapsTheFileReadOnly) {
  const std::string dir = MakeTempDir("safetensors_test_");
  ASSERT_FALSE(dir.empty());
  std::vector<uint8_t> data(128);
  const float values[2] = {1.5f, -2.0f};
  std::memcpy(data.data() + 64, values, sizeof(values));
  const std::vector<uint8_t> file = MakeFile(GoodHeader(), data);
  const std::string path = dir + "/w.safetensors";
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
  auto f = SafetensorsFile::Open(path, 64);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  const SafetensorsEntry* b = (*f)->Find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ((*f)->Find("zz"), nullptr);
  const float* mapped = static_cast<const float*>((*f)->Data(*b));
  EXPECT_EQ(mapped[0], 1.5f);
  EXPECT_EQ(mapped[1], -2.0f);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(mapped) % 64, 0u);

  auto missing = SafetensorsFile::Open(dir + "/none.safetensors");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  std::ofstream(dir + "/short.safetensors") << "abc";
  auto short_file = SafetensorsFile::Open(dir + "/short.safetensors");
  EXPECT_EQ(short_file.status().code(), StatusCode::kInvalidArgument);
  auto directory = SafetensorsFile::Open(dir);
  EXPECT_EQ(directory.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(RemoveTree(dir));
}

}  // namespace
}  // namespace dysco
