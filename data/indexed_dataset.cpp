#include "data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "runtime/error.h"

static_assert(std::endian::native == std::endian::little,
              "the Megatron .idx/.bin formats are little endian; add byte swapping for this host");

namespace ievo {

namespace {
constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr int64_t kHeaderBytes = 9 + 8 + 1 + 8 + 8;  // magic, version, dtype, S, D+1

template <typename T>
T load(const char* p) {  // the .idx arrays start at byte 34, so they are not aligned
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
}  // namespace

int64_t dtype_code_size(int code) {
  switch (code) {
    case kDtypeU8: case kDtypeI8: return 1;
    case kDtypeI16: case kDtypeU16: return 2;
    case kDtypeI32: case kDtypeF32: return 4;
    case kDtypeI64: case kDtypeF64: return 8;
  }
  IEVO_FAIL("unknown Megatron dtype code ", code, " (valid: 1..8)");
}

const char* dtype_code_name(int code) {
  switch (code) {
    case kDtypeU8: return "uint8";
    case kDtypeI8: return "int8";
    case kDtypeI16: return "int16";
    case kDtypeI32: return "int32";
    case kDtypeI64: return "int64";
    case kDtypeF64: return "float64";
    case kDtypeF32: return "float32";
    case kDtypeU16: return "uint16";
  }
  return "unknown";
}

int best_dtype_code(int64_t vocab_size) { return vocab_size < 65500 ? kDtypeU16 : kDtypeI32; }

// ---------------------------------------------------------------------------------------------
// Read side

namespace detail {
struct MappedFile {
  std::string path;
  const char* data = nullptr;
  int64_t size = 0;

  explicit MappedFile(const std::string& p) : path(p) {
    int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) IEVO_FAIL("cannot open ", p, ": ", std::strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      IEVO_FAIL("cannot stat ", p, ": ", std::strerror(e));
    }
    size = static_cast<int64_t>(st.st_size);
    if (size > 0) {  // mmap of 0 bytes is invalid; an empty file maps to nullptr
      void* m = mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_SHARED, fd, 0);
      if (m == MAP_FAILED) {
        int e = errno;
        ::close(fd);
        IEVO_FAIL("cannot mmap ", p, ": ", std::strerror(e));
      }
      data = static_cast<const char*>(m);
    }
    ::close(fd);  // the mapping stays valid
  }
  ~MappedFile() {
    if (data) munmap(const_cast<char*>(data), static_cast<size_t>(size));
  }
};
}  // namespace detail

IndexedDataset::~IndexedDataset() = default;

std::shared_ptr<IndexedDataset> IndexedDataset::open(const std::string& prefix) {
  std::shared_ptr<IndexedDataset> ds(new IndexedDataset());
  ds->prefix_ = prefix;
  const std::string ip = ds->idx_path(), bp = ds->bin_path();
  ds->idx_ = std::make_unique<detail::MappedFile>(ip);
  ds->bin_ = std::make_unique<detail::MappedFile>(bp);
  const char* p = ds->idx_->data;
  const int64_t isize = ds->idx_->size;

  if (isize < kHeaderBytes)
    IEVO_FAIL(ip, ": truncated header (", isize, " bytes, a Megatron index needs at least ",
              kHeaderBytes, ")");
  if (std::memcmp(p, kMagic, 9) != 0)
    IEVO_FAIL(ip, ": bad magic (expected \"MMIDIDX\\0\\0\"): not a Megatron mmap index");
  const uint64_t version = load<uint64_t>(p + 9);
  if (version != 1) IEVO_FAIL(ip, ": unsupported index version ", version, " (expected 1)");
  const int code = static_cast<uint8_t>(p[17]);
  if (code < kDtypeU8 || code > kDtypeU16)
    IEVO_FAIL(ip, ": unknown dtype code ", code, " (valid: 1..8)");
  ds->dtype_code_ = code;
  ds->itemsize_ = dtype_code_size(code);
  const uint64_t S = load<uint64_t>(p + 18), Dc = load<uint64_t>(p + 26);
  if (Dc < 1) IEVO_FAIL(ip, ": document_count is 0 (document_indices needs at least [0])");

  // Sizes must match exactly: 4 S (lengths) + 8 S (pointers) + 8 (D + 1) (document indices).
  const uint64_t limit = static_cast<uint64_t>(isize);
  if (S > limit || Dc > limit)  // also keeps the products below from overflowing
    IEVO_FAIL(ip, ": sequence_count ", S, " / document_count ", Dc,
              " cannot fit a file of ", isize, " bytes (truncated index?)");
  const uint64_t need = kHeaderBytes + 12 * S + 8 * Dc;
  if (need != limit)
    IEVO_FAIL(ip, ": ", S, " sequences and ", Dc, " document indices need ", need,
              " bytes but the file has ", isize, need > limit ? " (truncated)" : " (trailing bytes)");
  ds->num_sequences_ = static_cast<int64_t>(S);
  ds->num_documents_ = static_cast<int64_t>(Dc) - 1;
  ds->lengths_ = p + kHeaderBytes;
  ds->pointers_ = ds->lengths_ + 4 * S;
  ds->doc_idx_ = ds->pointers_ + 8 * S;

  // Every sequence lies inside .bin.
  const int64_t bsize = ds->bin_->size;
  int64_t tokens = 0;
  for (int64_t i = 0; i < ds->num_sequences_; ++i) {
    const int64_t len = ds->sequence_length(i), ptr = ds->sequence_pointer(i);
    if (len < 0) IEVO_FAIL(ip, ": sequence ", i, " has negative length ", len);
    if (ptr < 0 || ptr > bsize || len > (bsize - ptr) / ds->itemsize_)
      IEVO_FAIL(bp, ": sequence ", i, " (", len, " tokens of ", dtype_code_name(code),
                " at byte ", ptr, ") runs past the end of the file (", bsize,
                " bytes; truncated .bin?)");
    tokens += len;
  }
  ds->num_tokens_ = tokens;

  // Document boundaries: 0 = d[0] <= d[1] <= ... <= d[D] = S.
  if (ds->document_start(0) != 0)
    IEVO_FAIL(ip, ": document_indices[0] is ", ds->document_start(0), " (expected 0)");
  for (int64_t d = 0; d < ds->num_documents_; ++d)
    if (ds->document_start(d + 1) < ds->document_start(d))
      IEVO_FAIL(ip, ": document_indices not monotone at document ", d, " (",
                ds->document_start(d), " then ", ds->document_start(d + 1), ")");
  if (ds->document_start(ds->num_documents_) != ds->num_sequences_)
    IEVO_FAIL(ip, ": last document index is ", ds->document_start(ds->num_documents_),
              " but there are ", ds->num_sequences_, " sequences");
  return ds;
}

int64_t IndexedDataset::sequence_length(int64_t i) const {
  IEVO_CHECK(i >= 0 && i < num_sequences_, idx_path(), ": sequence ", i, " out of range [0, ",
             num_sequences_, ")");
  return load<int32_t>(lengths_ + 4 * i);
}

int64_t IndexedDataset::sequence_pointer(int64_t i) const {
  IEVO_CHECK(i >= 0 && i < num_sequences_, idx_path(), ": sequence ", i, " out of range [0, ",
             num_sequences_, ")");
  return load<int64_t>(pointers_ + 8 * i);
}

int64_t IndexedDataset::document_start(int64_t d) const {
  IEVO_CHECK(d >= 0 && d <= num_documents_, idx_path(), ": document ", d, " out of range [0, ",
             num_documents_, "]");
  return load<int64_t>(doc_idx_ + 8 * d);
}

int64_t IndexedDataset::document_length(int64_t d) const {
  int64_t n = 0;
  for (int64_t s = document_start(d), e = document_start(d + 1); s < e; ++s) n += sequence_length(s);
  return n;
}

namespace {
template <typename T>
void convert(const char* src, int64_t n, int32_t* out, const std::string& path, int64_t seq) {
  for (int64_t k = 0; k < n; ++k) {
    const T v = load<T>(src + k * static_cast<int64_t>(sizeof(T)));
    if constexpr (sizeof(T) < 4 || std::is_same_v<T, int32_t>) {
      out[k] = static_cast<int32_t>(v);
    } else {  // int64 / float: the value has to be an int32
      const bool ok = std::is_floating_point_v<T>
                          ? (v == std::floor(v) && v >= -2147483648.0 && v <= 2147483647.0)
                          : (v >= std::numeric_limits<int32_t>::min() &&
                             v <= std::numeric_limits<int32_t>::max());
      if (!ok) IEVO_FAIL(path, ": token ", v, " in sequence ", seq, " is not an int32 token id");
      out[k] = static_cast<int32_t>(v);
    }
  }
}
}  // namespace

void IndexedDataset::read_sequence(int64_t i, int64_t offset, int64_t n, int32_t* out) const {
  const int64_t len = sequence_length(i);
  IEVO_CHECK(offset >= 0 && n >= 0 && offset + n <= len, bin_path(), ": read of tokens [",
             offset, ", ", offset + n, ") from sequence ", i, " of length ", len);
  const char* src = bin_->data + sequence_pointer(i) + offset * itemsize_;
  const std::string& bp = bin_->path;
  switch (dtype_code_) {
    case kDtypeU8: return convert<uint8_t>(src, n, out, bp, i);
    case kDtypeI8: return convert<int8_t>(src, n, out, bp, i);
    case kDtypeI16: return convert<int16_t>(src, n, out, bp, i);
    case kDtypeI32: return convert<int32_t>(src, n, out, bp, i);
    case kDtypeI64: return convert<int64_t>(src, n, out, bp, i);
    case kDtypeF64: return convert<double>(src, n, out, bp, i);
    case kDtypeF32: return convert<float>(src, n, out, bp, i);
    case kDtypeU16: return convert<uint16_t>(src, n, out, bp, i);
  }
}

void IndexedDataset::read_document(int64_t d, int64_t offset, int64_t n, int32_t* out) const {
  IEVO_CHECK(offset >= 0 && n >= 0, "bad read of document ", d, " in ", bin_path());
  for (int64_t s = document_start(d), e = document_start(d + 1); s < e && n > 0; ++s) {
    const int64_t len = sequence_length(s);
    if (offset >= len) {
      offset -= len;
      continue;
    }
    const int64_t take = std::min(n, len - offset);
    read_sequence(s, offset, take, out);
    out += take;
    n -= take;
    offset = 0;
  }
  IEVO_CHECK(n == 0, bin_path(), ": read past the end of document ", d);
}

std::vector<int32_t> IndexedDataset::document(int64_t d) const {
  std::vector<int32_t> v(static_cast<size_t>(document_length(d)));
  read_document(d, 0, static_cast<int64_t>(v.size()), v.data());
  return v;
}

// ---------------------------------------------------------------------------------------------
// Write side

IndexedDatasetWriter::IndexedDatasetWriter(const std::string& prefix, int dtype_code)
    : prefix_(prefix), dtype_code_(dtype_code) {
  dtype_code_size(dtype_code);  // validates the code
  const std::string tmp = prefix_ + ".bin.tmp";
  bin_ = std::fopen(tmp.c_str(), "wb");
  if (!bin_) IEVO_FAIL("cannot create ", tmp, ": ", std::strerror(errno));
}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (finalized_) return;
  if (bin_) std::fclose(bin_);
  std::remove((prefix_ + ".bin.tmp").c_str());
  std::remove((prefix_ + ".idx.tmp").c_str());
}

namespace {
template <typename T>
void encode(const int32_t* t, int64_t n, std::vector<char>& buf, int64_t lo, int64_t hi,
            const std::string& prefix, int64_t doc, const char* dtype) {
  buf.resize(static_cast<size_t>(n) * sizeof(T));
  for (int64_t k = 0; k < n; ++k) {
    if (t[k] < lo || t[k] > hi)
      IEVO_FAIL("writing ", prefix, ".bin: token ", t[k], " (position ", k, " of document ", doc,
                ") does not fit ", dtype);
    const T v = static_cast<T>(t[k]);
    std::memcpy(buf.data() + k * static_cast<int64_t>(sizeof(T)), &v, sizeof(T));
  }
}
}  // namespace

void IndexedDatasetWriter::add_sequence(const int32_t* tokens, int64_t n) {
  IEVO_CHECK(!finalized_, prefix_, ": add_sequence after finalize");
  IEVO_CHECK(n >= 0 && n <= std::numeric_limits<int32_t>::max(), prefix_,
             ": sequence length ", n, " does not fit int32");
  const int64_t doc = num_documents();
  const char* name = dtype_code_name(dtype_code_);
  constexpr int64_t kI32Lo = std::numeric_limits<int32_t>::min(), kI32Hi = -(kI32Lo + 1);
  switch (dtype_code_) {
    case kDtypeU8: encode<uint8_t>(tokens, n, buf_, 0, 255, prefix_, doc, name); break;
    case kDtypeI8: encode<int8_t>(tokens, n, buf_, -128, 127, prefix_, doc, name); break;
    case kDtypeI16: encode<int16_t>(tokens, n, buf_, -32768, 32767, prefix_, doc, name); break;
    case kDtypeU16: encode<uint16_t>(tokens, n, buf_, 0, 65535, prefix_, doc, name); break;
    case kDtypeI32: encode<int32_t>(tokens, n, buf_, kI32Lo, kI32Hi, prefix_, doc, name); break;
    case kDtypeI64: encode<int64_t>(tokens, n, buf_, kI32Lo, kI32Hi, prefix_, doc, name); break;
    case kDtypeF64: encode<double>(tokens, n, buf_, kI32Lo, kI32Hi, prefix_, doc, name); break;
    // float32 holds integers exactly up to 2^24
    case kDtypeF32: encode<float>(tokens, n, buf_, -(1 << 24), 1 << 24, prefix_, doc, name); break;
  }
  if (!buf_.empty() && std::fwrite(buf_.data(), 1, buf_.size(), bin_) != buf_.size())
    IEVO_FAIL("write to ", prefix_, ".bin.tmp failed: ", std::strerror(errno));
  lengths_.push_back(static_cast<int32_t>(n));
}

void IndexedDatasetWriter::end_document() {
  doc_idx_.push_back(num_sequences());
}

void IndexedDatasetWriter::add_document(const std::vector<int32_t>& tokens) {
  add_sequence(tokens.data(), static_cast<int64_t>(tokens.size()));
  end_document();
}

void IndexedDatasetWriter::finalize() {
  IEVO_CHECK(!finalized_, prefix_, ": finalize called twice");
  if (doc_idx_.back() != num_sequences()) end_document();  // close a trailing open document
  const std::string bin_tmp = prefix_ + ".bin.tmp", idx_tmp = prefix_ + ".idx.tmp";
  const bool bin_ok = std::fflush(bin_) == 0 && !std::ferror(bin_);
  if (std::fclose(bin_) != 0 || !bin_ok) {
    bin_ = nullptr;
    IEVO_FAIL("write to ", bin_tmp, " failed: ", std::strerror(errno));
  }
  bin_ = nullptr;

  FILE* f = std::fopen(idx_tmp.c_str(), "wb");
  if (!f) IEVO_FAIL("cannot create ", idx_tmp, ": ", std::strerror(errno));
  const uint64_t version = 1, S = lengths_.size(), Dc = doc_idx_.size();
  const uint8_t code = static_cast<uint8_t>(dtype_code_);
  std::vector<int64_t> pointers(lengths_.size());
  int64_t ptr = 0;
  for (size_t i = 0; i < lengths_.size(); ++i) {
    pointers[i] = ptr;
    ptr += lengths_[i] * dtype_code_size(dtype_code_);
  }
  bool ok = std::fwrite(kMagic, 1, 9, f) == 9 && std::fwrite(&version, 8, 1, f) == 1 &&
            std::fwrite(&code, 1, 1, f) == 1 && std::fwrite(&S, 8, 1, f) == 1 &&
            std::fwrite(&Dc, 8, 1, f) == 1 &&
            std::fwrite(lengths_.data(), 4, S, f) == S &&
            std::fwrite(pointers.data(), 8, S, f) == S &&
            std::fwrite(doc_idx_.data(), 8, Dc, f) == Dc;
  ok = std::fflush(f) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) IEVO_FAIL("write to ", idx_tmp, " failed: ", std::strerror(errno));

  // .bin first: a reader that opens PREFIX.idx then finds the matching .bin already there.
  if (std::rename(bin_tmp.c_str(), (prefix_ + ".bin").c_str()) != 0 ||
      std::rename(idx_tmp.c_str(), (prefix_ + ".idx").c_str()) != 0)
    IEVO_FAIL("cannot rename ", prefix_, ".{bin,idx}.tmp into place: ", std::strerror(errno));
  finalized_ = true;
}

}  // namespace ievo
