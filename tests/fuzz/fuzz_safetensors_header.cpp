// libFuzzer target: the header parser of a package's weights file,
// ParseSafetensorsHeader(data, size, origin, alignment) (core/model/safetensors_file.h), on
// arbitrary bytes taken as a whole file (seeds: small valid files, 64-byte aligned, and broken
// variants).
//
// Invariants: no exception escapes and nothing is read outside [data, data + size) (ASan); an
// error is INVALID_ARGUMENT and starts with the origin; an accepted header describes tensors that
// lie inside the file, do not overlap, are aligned to the alignment asked and to their item size,
// and whose shape times item size is their byte length.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "core/model/safetensors_file.h"
#include "tests/fuzz/fuzz_check.h"

namespace dysco {
namespace {

const char kOrigin[] = "fuzz/weights.safetensors";

void CheckHeader(const SafetensorsHeader& h, size_t size, uint64_t alignment) {
  FUZZ_CHECK(h.data_start >= 8 && h.data_start <= size, "data_start");
  uint64_t prev_end = 0;
  for (const SafetensorsEntry& e : h.entries) {
    FUZZ_CHECK(e.item_size == SafetensorsItemSize(e.dtype) && e.item_size > 0, e.name);
    FUZZ_CHECK(e.offset >= h.data_start && e.offset <= size && e.size <= size - e.offset,
               "outside the file: " + e.name);
    FUZZ_CHECK(e.offset % alignment == 0 && e.offset % static_cast<uint64_t>(e.item_size) == 0,
               "misaligned: " + e.name);
    __int128 bytes = e.item_size;
    bool empty = false;
    for (int64_t d : e.shape) {
      FUZZ_CHECK(d >= 0, "negative count: " + e.name);
      if (d == 0)
        empty = true;
      else
        bytes *= d;
      FUZZ_CHECK(bytes <= INT64_MAX, "overflow: " + e.name);
    }
    FUZZ_CHECK(static_cast<uint64_t>(empty ? 0 : bytes) == e.size, "byte length: " + e.name);
    if (e.size != 0) {
      FUZZ_CHECK(e.offset >= prev_end, "overlap: " + e.name);
      prev_end = e.offset + e.size;
    }
  }
}

}  // namespace
}  // namespace dysco

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The first byte picks the alignment asked for (1, 2, ..., 128), as the loader asks 64.
  if (size == 0) return 0;
  const uint64_t alignment = uint64_t{1} << (data[0] % 8);
  ++data;
  --size;
  try {
    auto h = dysco::ParseSafetensorsHeader(data, size, dysco::kOrigin, alignment);
    if (h.ok()) {
      dysco::CheckHeader(h.value(), size, alignment);
    } else {
      FUZZ_CHECK(h.status().code() == dysco::StatusCode::kInvalidArgument, h.status().ToString());
      FUZZ_CHECK(h.status().message().rfind(std::string(dysco::kOrigin) + ": ", 0) == 0,
                 h.status().ToString());
    }
  } catch (const std::exception& e) {
    FUZZ_CHECK(false, std::string("exception: ") + e.what());
  }
  return 0;
}
