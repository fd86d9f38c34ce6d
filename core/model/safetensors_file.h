// SafetensorsFile: a read-only memory mapping of a .safetensors file (a package's
// weights.safetensors, docs/model-interface.md) with its header parsed and validated, so that the
// model runner can use each tensor's bytes in place. Torch-free: the model runner makes tensors
// over the mapped bytes.
//
// The file is untrusted input: ParseSafetensorsHeader checks everything before any byte of tensor
// data is used (header length, JSON, dtype names, shapes, shape x item size == byte length without
// overflow, offsets in range and non-overlapping, alignment) and reports the first problem as
// INVALID_ARGUMENT naming the file and the tensor; it never reads outside the buffer it is given.
//
// Thread-safety: immutable after Open; any number of threads may read it concurrently.
// Ownership: Open returns a shared_ptr; the mapping lives as long as the last owner (tensors made
// over it hold a copy). Data pointers are valid while the SafetensorsFile is alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/base/status.h"

namespace dysco {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // safetensors dtype name: "F32", "F16", "BF16", "U8", ...
  int item_size = 0;  // bytes per element of dtype
  std::vector<int64_t> shape;
  uint64_t offset = 0;  // of the first byte, from the start of the FILE (not of the data section)
  uint64_t size = 0;    // bytes
};

struct SafetensorsHeader {
  uint64_t data_start = 0;                // 8 + header length
  std::vector<SafetensorsEntry> entries;  // in file order (by offset)
};

// Bytes per element of a safetensors dtype name; 0 when unknown.
int SafetensorsItemSize(const std::string& dtype);

// Parses and validates the header of a safetensors file whose whole content is data[0, size)
// (only the first 8 + header-length bytes are read). Every tensor's file offset must be a multiple
// of `alignment` (a power of two, >= 1) and of its item size. `origin` names the file in errors.
StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t size,
                                                   const std::string& origin,
                                                   uint64_t alignment = 1);

class SafetensorsFile {
 public:
  // Maps `path` read-only (PROT_READ, MAP_PRIVATE) and parses its header. NOT_FOUND when the file
  // cannot be opened, INVALID_ARGUMENT for a malformed or truncated file, INTERNAL when mmap fails.
  static StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path,
                                                               uint64_t alignment = 1);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return header_.entries; }
  // nullptr when the file has no tensor of that name.
  const SafetensorsEntry* Find(const std::string& name) const;
  // The entry's first byte in the mapping (read-only memory: never write through it).
  const void* Data(const SafetensorsEntry& entry) const;
  size_t file_size() const { return size_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  SafetensorsHeader header_;
};

}  // namespace dysco
