// attnkit/io/safetensors.hpp — safetensors reader (mmap, zero-copy), sharded checkpoints, writer.
//
// File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length
// N, then N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// "__metadata__": {str: str}}, then the data section; offsets are relative to its start.
//
// Contract:
//  * Everything a file claims is validated when it is opened (header bounds, JSON types, dtypes,
//    shapes, offsets, sizes, overlaps, duplicate names); a bad file throws attnkit::Error naming
//    the file, the tensor where there is one, and the problem. Nothing is read lazily.
//  * TensorInfo::data points into the mapping (or the caller's buffer): no copy. It stays valid
//    while the SafetensorsFile / Checkpoint that produced it is alive (moves keep it valid).
//    Data are little-endian and only as aligned as the file makes them; use to_f32 / to_i64, or
//    data_as<T> which checks dtype and alignment.
//  * 0-dim tensors have shape {} and one element; a shape containing 0 has no bytes.
//  * Checkpoint reads a Hugging Face model directory: model.safetensors, or the shards listed in
//    model.safetensors.index.json ("weight_map": tensor name -> shard file name).
//  * The writer lays tensors out in sorted name order with contiguous offsets and pads the header
//    with spaces to a multiple of 8 bytes.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <nlohmann/json.hpp>

#include "attnkit/core/bf16.hpp"
#include "attnkit/core/error.hpp"
#include "attnkit/io/json_file.hpp"

namespace attnkit::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors data are little-endian; the zero-copy reader assumes a little-endian host");

enum class DType { F32, BF16, F16, F64, I64, I32 };

inline std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::F16: return 2;
    case DType::F64: return 8;
    case DType::I64: return 8;
    case DType::I32: return 4;
  }
  return 0;
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
  }
  return "?";
}

inline bool is_float_dtype(DType d) {
  return d == DType::F32 || d == DType::BF16 || d == DType::F16 || d == DType::F64;
}

// Parses a safetensors dtype string ("F32", "BF16", ...). `context` parts prefix the error.
template <class... Context>
DType parse_dtype(std::string_view s, Context&&... context) {
  for (DType d : {DType::F32, DType::BF16, DType::F16, DType::F64, DType::I64, DType::I32})
    if (s == dtype_name(d)) return d;
  detail::throw_error(std::forward<Context>(context)..., "unknown dtype '", s,
                      "' (supported: F32, BF16, F16, F64, I64, I32)");
}

inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;  // {} for 0-dim (one element)
  const std::byte* data = nullptr;  // points into the mapping (no copy)
  std::size_t nbytes = 0;
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

namespace detail_io {

// Largest header we accept; real headers are kilobytes (a 0.6B model's is ~30 KB).
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

class FileMapping {
 public:
  FileMapping(const void* addr, std::size_t size) : addr_(addr), size_(size) {}
  FileMapping(const FileMapping&) = delete;
  FileMapping& operator=(const FileMapping&) = delete;
  ~FileMapping() {
    if (addr_ != nullptr) ::munmap(const_cast<void*>(addr_), size_);
  }
  const std::byte* data() const { return static_cast<const std::byte*>(addr_); }
  std::size_t size() const { return size_; }

 private:
  const void* addr_;
  std::size_t size_;
};

// Maps `file` read-only. Files shorter than 8 bytes are rejected here (mmap of 0 bytes fails).
inline std::unique_ptr<FileMapping> map_file(const std::filesystem::path& file) {
  const std::string name = file.string();
  const int fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const std::error_code ec(errno, std::generic_category());
    detail::throw_error(name, ": cannot open: ", ec.message());
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) detail::throw_error(name, ": cannot stat");
  ATTNKIT_REQUIRE(S_ISREG(st.st_mode), name, ": not a regular file");
  const auto size = static_cast<std::size_t>(st.st_size);
  ATTNKIT_REQUIRE(size >= 8, name, ": file is ", size, " bytes, shorter than the 8-byte header length");
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (addr == MAP_FAILED) {
    const std::error_code ec(errno, std::generic_category());
    detail::throw_error(name, ": mmap failed: ", ec.message());
  }
  return std::make_unique<FileMapping>(addr, size);
}

// A non-negative JSON integer that fits in int64, or an error naming `what`.
template <class... Context>
std::uint64_t nonneg_integer(const nlohmann::json& v, Context&&... context) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    ATTNKIT_REQUIRE(u <= static_cast<std::uint64_t>(INT64_MAX), context..., " is too large (", u, ")");
    return u;
  }
  ATTNKIT_REQUIRE(v.is_number_integer(), context..., " is not an integer (", v.type_name(), ")");
  const auto i = v.get<std::int64_t>();
  ATTNKIT_REQUIRE(i >= 0, context..., " is negative (", i, ")");
  return static_cast<std::uint64_t>(i);
}

inline std::uint64_t read_le_u64(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint64_t>(p[i]);
  return v;
}

inline float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {
    // inf, or NaN with its payload kept and the quiet bit set (what vcvtph2ps does)
    bits = sign | 0x7f800000u | (man << 13) | (man != 0 ? 0x400000u : 0u);
  } else if (exp != 0) {
    bits = sign | ((exp + (127 - 15)) << 23) | (man << 13);
  } else {
    // zero or subnormal: man * 2^-24, exact in float32
    const float mag = static_cast<float>(man) * 0x1p-24f;
    std::memcpy(&bits, &mag, 4);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace detail_io

// Exact IEEE binary16 -> binary32 conversion (subnormals, inf and NaN included).
inline float f16_to_f32(std::uint16_t h) { return detail_io::half_to_float(h); }

class SafetensorsFile {
 public:
  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  static SafetensorsFile open(const std::filesystem::path& file) {
    SafetensorsFile f;
    f.path_ = file.string();
    f.mapping_ = detail_io::map_file(file);
    f.parse(f.mapping_->data(), f.mapping_->size());
    return f;
  }

  // Borrows `bytes` (no copy): they must outlive the returned object.
  static SafetensorsFile from_memory(const void* bytes, std::size_t size, std::string name) {
    SafetensorsFile f;
    f.path_ = std::move(name);
    ATTNKIT_REQUIRE(bytes != nullptr || size == 0, f.path_, ": null buffer of ", size, " bytes");
    ATTNKIT_REQUIRE(size >= 8, f.path_, ": file is ", size, " bytes, shorter than the 8-byte header length");
    f.parse(static_cast<const std::byte*>(bytes), size);
    return f;
  }

  bool contains(std::string_view name) const { return find(name) != nullptr; }

  const TensorInfo& tensor(std::string_view name) const {
    const TensorInfo* t = find(name);
    ATTNKIT_REQUIRE(t != nullptr, path_, ": missing tensor '", name, "'");
    return *t;
  }

  // All tensors, sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  std::vector<std::string> names() const {
    std::vector<std::string> r;
    r.reserve(tensors_.size());
    for (const auto& t : tensors_) r.push_back(t.name);
    return r;
  }
  // The "__metadata__" object (string -> string), or an empty object.
  const nlohmann::json& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;

  const TensorInfo* find(std::string_view name) const {
    auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                               [](const TensorInfo& t, std::string_view n) { return t.name < n; });
    return it != tensors_.end() && it->name == name ? &*it : nullptr;
  }

  void parse(const std::byte* base, std::size_t size) {
    const std::string& file = path_;
    const std::uint64_t header_len = detail_io::read_le_u64(base);
    ATTNKIT_REQUIRE(header_len <= detail_io::kMaxHeaderBytes, file, ": header length ", header_len,
                    " is absurd (more than ", detail_io::kMaxHeaderBytes, " bytes)");
    ATTNKIT_REQUIRE(header_len <= size - 8, file, ": header length ", header_len,
                    " extends beyond the end of the file (", size, " bytes)");
    const char* text = reinterpret_cast<const char*>(base + 8);
    const std::byte* data_section = base + 8 + header_len;
    const std::uint64_t data_size = size - 8 - header_len;

    // nlohmann keeps the last of duplicate keys silently; watch top-level keys while parsing.
    std::unordered_set<std::string> seen;
    std::string duplicate;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(
          text, text + header_len,
          [&](int depth, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
            if (depth == 1 && ev == nlohmann::json::parse_event_t::key && duplicate.empty()) {
              const auto& key = parsed.get_ref<const std::string&>();
              if (!seen.insert(key).second) duplicate = key;
            }
            return true;
          });
    } catch (const nlohmann::json::exception& e) {
      detail::throw_error(file, ": header is not valid JSON: ", e.what());
    }
    ATTNKIT_REQUIRE(header.is_object(), file, ": header is not a JSON object (", header.type_name(), ")");
    ATTNKIT_REQUIRE(duplicate.empty(), file, ": duplicate tensor name '", duplicate, "' in header");

    metadata_ = nlohmann::json::object();
    tensors_.clear();
    tensors_.reserve(header.size());
    struct Extent {
      std::uint64_t begin, end;
      const std::string* name;
    };
    std::vector<Extent> extents;
    extents.reserve(header.size());
    for (const auto& [key, entry] : header.items()) {
      if (key == "__metadata__") {
        ATTNKIT_REQUIRE(entry.is_object(), file, ": __metadata__ must be an object of strings, got ",
                        entry.type_name());
        for (const auto& [mk, mv] : entry.items())
          ATTNKIT_REQUIRE(mv.is_string(), file, ": __metadata__ entry '", mk, "' must be a string, got ",
                          mv.type_name());
        metadata_ = entry;
        continue;
      }
      ATTNKIT_REQUIRE(entry.is_object(), file, ": tensor '", key, "': entry is not a JSON object");
      for (const char* field : {"dtype", "shape", "data_offsets"})
        ATTNKIT_REQUIRE(entry.contains(field), file, ": tensor '", key, "': missing '", field, "'");

      TensorInfo t;
      t.name = key;
      const auto& dt = entry["dtype"];
      ATTNKIT_REQUIRE(dt.is_string(), file, ": tensor '", key, "': 'dtype' is not a string (", dt.type_name(), ")");
      t.dtype = parse_dtype(dt.get_ref<const std::string&>(), file, ": tensor '", key, "': ");

      const auto& sh = entry["shape"];
      ATTNKIT_REQUIRE(sh.is_array(), file, ": tensor '", key, "': 'shape' is not an array (", sh.type_name(), ")");
      std::uint64_t numel = 1;
      bool overflow = false;
      t.shape.reserve(sh.size());
      for (std::size_t i = 0; i < sh.size(); ++i) {
        const std::uint64_t dim = detail_io::nonneg_integer(sh[i], file, ": tensor '", key, "': shape entry ", i);
        t.shape.push_back(static_cast<std::int64_t>(dim));
        overflow = overflow || __builtin_mul_overflow(numel, dim, &numel);
      }
      std::uint64_t expected_bytes = 0;
      overflow = overflow || numel > static_cast<std::uint64_t>(INT64_MAX) ||
                 __builtin_mul_overflow(numel, dtype_size(t.dtype), &expected_bytes);
      ATTNKIT_REQUIRE(!overflow, file, ": tensor '", key, "': shape ", shape_string(t.shape),
                      " has more elements than fit in 64 bits");

      const auto& off = entry["data_offsets"];
      ATTNKIT_REQUIRE(off.is_array() && off.size() == 2, file, ": tensor '", key,
                      "': 'data_offsets' must be [begin, end]");
      const std::uint64_t begin = detail_io::nonneg_integer(off[0], file, ": tensor '", key, "': data_offsets begin");
      const std::uint64_t end = detail_io::nonneg_integer(off[1], file, ": tensor '", key, "': data_offsets end");
      ATTNKIT_REQUIRE(begin <= end, file, ": tensor '", key, "': data_offsets [", begin, ", ", end,
                      "] has begin > end");
      ATTNKIT_REQUIRE(end <= data_size, file, ": tensor '", key, "': data_offsets [", begin, ", ", end,
                      "] outside the data section (", data_size, " bytes)");
      ATTNKIT_REQUIRE(end - begin == expected_bytes, file, ": tensor '", key, "': data size ", end - begin,
                      " bytes does not match shape ", shape_string(t.shape), " x ", dtype_name(t.dtype), " (",
                      expected_bytes, " bytes)");
      t.data = data_section + begin;
      t.nbytes = static_cast<std::size_t>(end - begin);
      tensors_.push_back(std::move(t));
    }
    // Names are unique, so sorting by name gives a total order for lookup.
    std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });

    for (const auto& t : tensors_) {
      if (t.nbytes == 0) continue;  // an empty range cannot overlap anything
      const auto begin = static_cast<std::uint64_t>(t.data - data_section);
      extents.push_back({begin, begin + t.nbytes, &t.name});
    }
    std::sort(extents.begin(), extents.end(), [](const Extent& a, const Extent& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    for (std::size_t i = 1; i < extents.size(); ++i) {
      const Extent& a = extents[i - 1];
      const Extent& b = extents[i];
      ATTNKIT_REQUIRE(a.end <= b.begin, file, ": tensors '", *a.name, "' [", a.begin, ", ", a.end, ") and '", *b.name,
                      "' [", b.begin, ", ", b.end, ") overlap");
    }
  }

  std::unique_ptr<detail_io::FileMapping> mapping_;  // null when borrowing a caller buffer
  std::string path_;
  std::vector<TensorInfo> tensors_;
  nlohmann::json metadata_ = nlohmann::json::object();
};

class Checkpoint {
 public:
  Checkpoint(Checkpoint&&) noexcept = default;
  Checkpoint& operator=(Checkpoint&&) noexcept = default;
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  // A directory (model.safetensors.index.json preferred over model.safetensors), a .safetensors
  // file, or an index .json file.
  static Checkpoint open(const std::filesystem::path& dir_or_file) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_directory(dir_or_file, ec)) {
      if (fs::exists(dir_or_file / "model.safetensors.index.json", ec))
        return open_index(dir_or_file / "model.safetensors.index.json");
      if (fs::exists(dir_or_file / "model.safetensors", ec)) return open_single(dir_or_file / "model.safetensors");
      detail::throw_error(dir_or_file.string(), ": no model.safetensors or model.safetensors.index.json in directory");
    }
    ATTNKIT_REQUIRE(fs::exists(dir_or_file, ec), dir_or_file.string(), ": checkpoint does not exist");
    if (dir_or_file.extension() == ".json") return open_index(dir_or_file);
    return open_single(dir_or_file);
  }

  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  const TensorInfo& tensor(std::string_view name) const {
    auto it = index_.find(name);
    ATTNKIT_REQUIRE(it != index_.end(), path_, ": missing tensor '", name, "'");
    return shards_[it->second].tensor(name);
  }

  // Checked access for weights: a float dtype and exactly `expected_shape`.
  const TensorInfo& tensor(std::string_view name, std::span<const std::int64_t> expected_shape) const {
    const TensorInfo& t = tensor(name);
    ATTNKIT_REQUIRE(is_float_dtype(t.dtype), path_, ": tensor '", name, "': dtype ", dtype_name(t.dtype),
                    " is not a float type (F32, BF16, F16, F64)");
    ATTNKIT_REQUIRE(std::equal(t.shape.begin(), t.shape.end(), expected_shape.begin(), expected_shape.end()), path_,
                    ": tensor '", name, "': expected shape ", shape_string(expected_shape), ", got ",
                    shape_string(t.shape));
    return t;
  }
  const TensorInfo& tensor(std::string_view name, std::initializer_list<std::int64_t> expected_shape) const {
    return tensor(name, std::span<const std::int64_t>(expected_shape.begin(), expected_shape.size()));
  }

  std::vector<std::string> names() const {
    std::vector<std::string> r;
    r.reserve(index_.size());
    for (const auto& [n, _] : index_) r.push_back(n);
    return r;
  }
  const std::string& path() const { return path_; }
  const std::vector<SafetensorsFile>& shards() const { return shards_; }

 private:
  Checkpoint() = default;

  static Checkpoint open_single(const std::filesystem::path& file) {
    Checkpoint c;
    c.path_ = file.string();
    c.shards_.push_back(SafetensorsFile::open(file));
    for (const auto& t : c.shards_[0].tensors()) c.index_.emplace(t.name, 0);
    return c;
  }

  static Checkpoint open_index(const std::filesystem::path& index_file) {
    Checkpoint c;
    c.path_ = index_file.string();
    const std::string& idx = c.path_;
    const nlohmann::json j = read_json_file(index_file, "index file");
    ATTNKIT_REQUIRE(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), idx,
                    ": 'weight_map' must be an object of tensor name -> shard file");
    const auto dir = index_file.parent_path();
    std::map<std::string, std::size_t> shard_of_file;
    for (const auto& [name, shard] : j["weight_map"].items()) {
      ATTNKIT_REQUIRE(shard.is_string(), idx, ": weight_map entry '", name, "' is not a string (", shard.type_name(),
                      ")");
      const std::string& shard_name = shard.get_ref<const std::string&>();
      const std::filesystem::path rel(shard_name);
      // Shards live next to the index; refuse paths that would leave the checkpoint directory.
      bool escapes = rel.empty() || rel.is_absolute();
      for (const auto& part : rel) escapes = escapes || part == "..";
      ATTNKIT_REQUIRE(!escapes, idx, ": weight_map entry '", name, "': shard '", shard_name,
                      "' is not a file name inside the checkpoint directory");
      auto it = shard_of_file.find(shard_name);
      if (it == shard_of_file.end()) {
        std::error_code ec;
        ATTNKIT_REQUIRE(std::filesystem::is_regular_file(dir / rel, ec), idx, ": missing shard file '", shard_name,
                        "' (listed for tensor '", name, "')");
        c.shards_.push_back(SafetensorsFile::open(dir / rel));
        it = shard_of_file.emplace(shard_name, c.shards_.size() - 1).first;
      }
      ATTNKIT_REQUIRE(c.shards_[it->second].contains(name), idx, ": tensor '", name, "' is listed for shard '",
                      shard_name, "' but that shard does not contain it");
      c.index_.emplace(name, it->second);
    }
    return c;
  }

  std::string path_;
  std::vector<SafetensorsFile> shards_;
  std::map<std::string, std::size_t, std::less<>> index_;  // tensor name -> shard
};

// Converts a float tensor (F32/BF16/F16/F64) to float32: dst receives t.numel() elements.
inline void to_f32(const TensorInfo& t, float* dst) {
  ATTNKIT_REQUIRE(is_float_dtype(t.dtype), "to_f32: tensor '", t.name, "': dtype ", dtype_name(t.dtype),
                  " is not a float type");
  const std::size_t n = t.nbytes / dtype_size(t.dtype);
  ATTNKIT_REQUIRE(dst != nullptr || n == 0, "to_f32: argument 'dst': null");
  const std::byte* src = t.data;
  switch (t.dtype) {
    case DType::F32:
      if (n) std::memcpy(dst, src, n * 4);
      break;
    case DType::BF16: {
      std::size_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
        _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
#endif
      for (; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf16::to_float(h);
      }
      break;
    }
    case DType::F16: {
      std::size_t i = 0;
#if defined(__AVX512F__)
      // vcvtph2ps is exact and quiets NaNs like the scalar conversion.
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i))));
#endif
      for (; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = detail_io::half_to_float(h);
      }
      break;
    }
    case DType::F64:
      for (std::size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        dst[i] = static_cast<float>(d);
      }
      break;
    default: break;
  }
}

inline std::vector<float> to_f32(const TensorInfo& t) {
  ATTNKIT_REQUIRE(is_float_dtype(t.dtype), "to_f32: tensor '", t.name, "': dtype ", dtype_name(t.dtype),
                  " is not a float type");
  std::vector<float> r(t.nbytes / dtype_size(t.dtype));
  to_f32(t, r.data());
  return r;
}

// Integer tensors (I64/I32) widened to int64.
inline std::vector<std::int64_t> to_i64(const TensorInfo& t) {
  ATTNKIT_REQUIRE(t.dtype == DType::I64 || t.dtype == DType::I32, "to_i64: tensor '", t.name, "': dtype ",
                  dtype_name(t.dtype), " is not an integer type (I64, I32)");
  const std::size_t n = t.nbytes / dtype_size(t.dtype);
  std::vector<std::int64_t> r(n);
  if (t.dtype == DType::I64) {
    if (n) std::memcpy(r.data(), t.data, n * 8);
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      std::int32_t v;
      std::memcpy(&v, t.data + 4 * i, 4);
      r[i] = v;
    }
  }
  return r;
}

template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  else if constexpr (std::is_same_v<T, bf16>) return DType::BF16;
  else if constexpr (std::is_same_v<T, double>) return DType::F64;
  else if constexpr (std::is_same_v<T, std::int64_t>) return DType::I64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return DType::I32;
  else static_assert(sizeof(T) == 0, "no safetensors dtype for this type");
}

// Zero-copy typed pointer into the mapping; the dtype must match T exactly and the data must be
// aligned for T (true for files whose writer aligned them; otherwise convert with to_f32).
template <class T>
const T* data_as(const TensorInfo& t) {
  ATTNKIT_REQUIRE(t.dtype == dtype_of<T>(), "data_as: tensor '", t.name, "': dtype is ", dtype_name(t.dtype),
                  ", requested ", dtype_name(dtype_of<T>()));
  ATTNKIT_REQUIRE(reinterpret_cast<std::uintptr_t>(t.data) % alignof(T) == 0, "data_as: tensor '", t.name,
                  "': data is not aligned to ", alignof(T), " bytes");
  return reinterpret_cast<const T*>(t.data);
}

class SafetensorsWriter {
 public:
  // Copies nbytes from data; nbytes must equal numel(shape) * dtype_size(dtype).
  void add(std::string name, DType dtype, std::vector<std::int64_t> shape, const void* data, std::size_t nbytes) {
    ATTNKIT_REQUIRE(name != "__metadata__", "SafetensorsWriter::add: argument 'name': '__metadata__' is reserved");
    ATTNKIT_REQUIRE(!tensors_.contains(name), "SafetensorsWriter::add: argument 'name': duplicate tensor '", name, "'");
    std::uint64_t numel = 1, bytes = 0;
    bool overflow = false;
    for (auto s : shape) {
      ATTNKIT_REQUIRE(s >= 0, "SafetensorsWriter::add: argument 'shape': negative dimension in ", shape_string(shape),
                      " for tensor '", name, "'");
      overflow = overflow || __builtin_mul_overflow(numel, static_cast<std::uint64_t>(s), &numel);
    }
    overflow = overflow || __builtin_mul_overflow(numel, dtype_size(dtype), &bytes);
    ATTNKIT_REQUIRE(!overflow, "SafetensorsWriter::add: argument 'shape': ", shape_string(shape), " overflows");
    ATTNKIT_REQUIRE(bytes == nbytes, "SafetensorsWriter::add: argument 'nbytes': ", nbytes, " does not match shape ",
                    shape_string(shape), " x ", dtype_name(dtype), " (", bytes, " bytes) for tensor '", name, "'");
    ATTNKIT_REQUIRE(data != nullptr || nbytes == 0, "SafetensorsWriter::add: argument 'data': null for tensor '", name,
                    "'");
    Entry e{dtype, std::move(shape), std::vector<std::byte>(nbytes)};
    if (nbytes) std::memcpy(e.bytes.data(), data, nbytes);
    tensors_.emplace(std::move(name), std::move(e));
  }

  void add_f32(std::string name, std::vector<std::int64_t> shape, const float* data) {
    std::uint64_t numel = 1;
    for (auto s : shape) numel *= static_cast<std::uint64_t>(s > 0 ? s : 0);
    add(std::move(name), DType::F32, std::move(shape), data, numel * 4);
  }

  void set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

  // The complete file image.
  std::vector<std::byte> serialize() const {
    nlohmann::json header = nlohmann::json::object();
    std::uint64_t offset = 0;
    for (const auto& [name, e] : tensors_) {  // std::map: sorted by name
      header[name] = {{"dtype", dtype_name(e.dtype)},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + e.bytes.size()}}};
      offset += e.bytes.size();
    }
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    std::vector<std::byte> out(8 + text.size() + offset);
    const std::uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xffu);
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::size_t pos = 8 + text.size();
    for (const auto& [name, e] : tensors_) {
      if (!e.bytes.empty()) std::memcpy(out.data() + pos, e.bytes.data(), e.bytes.size());
      pos += e.bytes.size();
    }
    return out;
  }

  void write(const std::filesystem::path& file) const {
    const auto bytes = serialize();
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    ATTNKIT_REQUIRE(out.good(), "SafetensorsWriter::write: cannot open '", file.string(), "' for writing");
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    out.close();
    ATTNKIT_REQUIRE(!out.fail(), "SafetensorsWriter::write: writing '", file.string(), "' failed");
  }

 private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> bytes;
  };
  std::map<std::string, Entry> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace attnkit::io
