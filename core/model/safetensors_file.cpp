#include "core/model/safetensors_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include <nlohmann/json.hpp>

namespace dysco {

namespace {

using json = nlohmann::json;

// Larger headers are refused before they are parsed (the `safetensors` library's own limit).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr int kMaxDims = 8;
// Header JSON nests 3 levels ({name: {"shape": [..]}}); deeper values are refused while parsing,
// before they can exhaust the stack.
constexpr int kMaxJsonDepth = 8;

std::string Quoted(const std::string& name) { return "'" + name + "'"; }

bool AsCount(const json& v, uint64_t* out) {
  if (!v.is_number_unsigned()) {
    // nlohmann stores non-negative integers as unsigned; a negative or fractional one is refused.
    if (!v.is_number_integer() || v.get<int64_t>() < 0) return false;
  }
  *out = v.get<uint64_t>();
  return true;
}

}  // namespace

int SafetensorsItemSize(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" || dtype == "F8_E5M2")
    return 1;
  return 0;
}

StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t size,
                                                   const std::string& origin, uint64_t alignment) {
  const std::string prefix = origin + ": ";
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return InvalidArgumentError(prefix + "alignment " + std::to_string(alignment) +
                                " is not a power of two");
  }
  if (size < 8) {
    return InvalidArgumentError(prefix + "truncated safetensors file (" + std::to_string(size) +
                                " bytes, no header length)");
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  if (header_len > kMaxHeaderBytes) {
    return InvalidArgumentError(prefix + "safetensors header length " + std::to_string(header_len) +
                                " is over the " + std::to_string(kMaxHeaderBytes) +
                                "-byte limit (corrupt file?)");
  }
  if (header_len > size - 8) {
    return InvalidArgumentError(prefix + "truncated safetensors file (header of " +
                                std::to_string(header_len) + " bytes, file of " +
                                std::to_string(size) + ")");
  }
  SafetensorsHeader header;
  header.data_start = 8 + header_len;
  const uint64_t data_size = size - header.data_start;

  bool too_deep = false;
  const json::parser_callback_t limit_depth = [&too_deep](int depth, json::parse_event_t, json&) {
    if (depth <= kMaxJsonDepth) return true;
    too_deep = true;
    return false;
  };
  const char* text = reinterpret_cast<const char*>(data + 8);
  json root = json::parse(text, text + header_len, limit_depth, /*allow_exceptions=*/false);
  if (too_deep) return InvalidArgumentError(prefix + "safetensors header nested too deeply");
  if (root.is_discarded() || !root.is_object()) {
    return InvalidArgumentError(prefix + "safetensors header is not a JSON object");
  }
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& name = it.key();
    const json& info = it.value();
    if (name == "__metadata__") {
      if (!info.is_object()) {
        return InvalidArgumentError(prefix + "safetensors __metadata__ is not a JSON object");
      }
      continue;
    }
    const std::string where = prefix + "tensor " + Quoted(name) + ": ";
    if (!info.is_object()) return InvalidArgumentError(where + "header entry is not an object");
    SafetensorsEntry e;
    e.name = name;
    const auto dtype = info.find("dtype");
    if (dtype == info.end() || !dtype->is_string()) {
      return InvalidArgumentError(where + "no \"dtype\" string");
    }
    e.dtype = dtype->get<std::string>();
    e.item_size = SafetensorsItemSize(e.dtype);
    if (e.item_size == 0) return InvalidArgumentError(where + "unknown dtype \"" + e.dtype + "\"");
    const auto shape = info.find("shape");
    if (shape == info.end() || !shape->is_array() || shape->size() > kMaxDims) {
      return InvalidArgumentError(where + "\"shape\" is not an array of at most " +
                                  std::to_string(kMaxDims) + " counts");
    }
    // The byte size. The product of the non-zero counts times the item size must fit in int64
    // (torch's sizes), even when a zero count makes the tensor empty (as the exporter's reader).
    uint64_t bytes = static_cast<uint64_t>(e.item_size);
    bool empty = false;
    for (const json& d : *shape) {
      uint64_t count = 0;
      if (!AsCount(d, &count) ||
          count > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return InvalidArgumentError(where + "\"shape\" has an entry that is not a count");
      }
      e.shape.push_back(static_cast<int64_t>(count));
      if (count == 0) {
        empty = true;
        continue;
      }
      if (bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / count) {
        return InvalidArgumentError(where + "shape too large for its dtype");
      }
      bytes *= count;
    }
    if (empty) bytes = 0;
    const auto offsets = info.find("data_offsets");
    uint64_t begin = 0, end = 0;
    if (offsets == info.end() || !offsets->is_array() || offsets->size() != 2 ||
        !AsCount((*offsets)[0], &begin) || !AsCount((*offsets)[1], &end)) {
      return InvalidArgumentError(where + "\"data_offsets\" is not [begin, end]");
    }
    if (begin > end) {
      return InvalidArgumentError(where + "data_offsets [" + std::to_string(begin) + ", " +
                                  std::to_string(end) + "] end before they begin");
    }
    if (end > data_size) {
      return InvalidArgumentError(where + "data_offsets end at " + std::to_string(end) +
                                  ", past the " + std::to_string(data_size) +
                                  " bytes of data (truncated file?)");
    }
    if (end - begin != bytes) {
      return InvalidArgumentError(where + "data_offsets [" + std::to_string(begin) + ", " +
                                  std::to_string(end) + "] hold " + std::to_string(end - begin) +
                                  " bytes, its shape and dtype " + e.dtype + " need " +
                                  std::to_string(bytes));
    }
    e.offset = header.data_start + begin;  // <= size: no overflow
    e.size = bytes;
    if (e.offset % static_cast<uint64_t>(e.item_size) != 0 || e.offset % alignment != 0) {
      return InvalidArgumentError(
          where + "data at file offset " + std::to_string(e.offset) + " is not " +
          std::to_string(std::max<uint64_t>(alignment, e.item_size)) + "-byte aligned");
    }
    header.entries.push_back(std::move(e));
  }
  std::sort(header.entries.begin(), header.entries.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              return a.offset != b.offset ? a.offset < b.offset : a.size < b.size;
            });
  for (size_t i = 1; i < header.entries.size(); ++i) {
    const SafetensorsEntry& prev = header.entries[i - 1];
    const SafetensorsEntry& cur = header.entries[i];
    if (cur.size != 0 && prev.size != 0 && cur.offset < prev.offset + prev.size) {
      return InvalidArgumentError(prefix + "tensors " + Quoted(prev.name) + " and " +
                                  Quoted(cur.name) + " overlap");
    }
  }
  return header;
}

StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(const std::string& path,
                                                                       uint64_t alignment) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return NotFoundError(path + ": cannot open (" + std::strerror(errno) + ")");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return InternalError(path + ": fstat failed (" + std::strerror(err) + ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgumentError(path + ": not a regular file");
  }
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->size_ = static_cast<size_t>(st.st_size);
  if (file->size_ < 8) {
    ::close(fd);
    return InvalidArgumentError(path + ": truncated safetensors file (" +
                                std::to_string(file->size_) + " bytes, no header length)");
  }
  // Read-only and private: the weights are never written, and a later change of the file by
  // someone else must not be mistaken for ours (pages already read stay as they were only with
  // MAP_PRIVATE on some systems: packages are written to a temporary name and renamed anyway).
  void* map = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  if (map == MAP_FAILED) return InternalError(path + ": mmap failed (" + std::strerror(err) + ")");
  file->map_ = map;
  DYSCO_ASSIGN_OR_RETURN(file->header_, ParseSafetensorsHeader(static_cast<const uint8_t*>(map),
                                                               file->size_, path, alignment));
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, size_);
}

const SafetensorsEntry* SafetensorsFile::Find(const std::string& name) const {
  for (const SafetensorsEntry& e : header_.entries) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

const void* SafetensorsFile::Data(const SafetensorsEntry& entry) const {
  return static_cast<const uint8_t*>(map_) + entry.offset;
}

}  // namespace dysco
