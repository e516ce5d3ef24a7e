// Megatron indexed datasets: PREFIX.bin holds the tokens of every sequence back to back in one
// dtype; PREFIX.idx describes them (megatron/core/datasets/indexed_dataset.py). .idx layout, all
// little endian, no padding:
//   char     magic[9]            "MMIDIDX\0\0"
//   uint64   version             1
//   uint8    dtype code          1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
//                                7 float32, 8 uint16
//   uint64   sequence_count      S
//   uint64   document_count      D + 1 (length of document_indices)
//   int32    sequence_lengths[S]   tokens per sequence
//   int64    sequence_pointers[S]  byte offset of each sequence in .bin
//   int64    document_indices[D+1] first sequence of each document; [0] = 0, [D] = S
// Document d is sequences [document_indices[d], document_indices[d+1]). Megatron's preprocessing
// writes one sequence per document.
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace ievo {

// Megatron dtype codes.
enum : int {
  kDtypeU8 = 1, kDtypeI8 = 2, kDtypeI16 = 3, kDtypeI32 = 4, kDtypeI64 = 5,
  kDtypeF64 = 6, kDtypeF32 = 7, kDtypeU16 = 8,
};
// Bytes per token of a dtype code; throws ievo::Error for an unknown code.
int64_t dtype_code_size(int code);
const char* dtype_code_name(int code);  // "uint16", ...
// The token dtype Megatron picks for a vocabulary: uint16 when vocab_size < 65500, else int32.
int best_dtype_code(int64_t vocab_size);

namespace detail {
struct MappedFile;  // a read-only mmap of a whole file
}

// Read-only view of PREFIX.bin/.idx through mmap. open() validates the whole index; every read
// afterwards is bounds-checked against it.
class IndexedDataset {
 public:
  static std::shared_ptr<IndexedDataset> open(const std::string& prefix);
  ~IndexedDataset();

  const std::string& prefix() const { return prefix_; }
  std::string bin_path() const { return prefix_ + ".bin"; }
  std::string idx_path() const { return prefix_ + ".idx"; }
  int dtype_code() const { return dtype_code_; }

  int64_t num_sequences() const { return num_sequences_; }
  int64_t num_documents() const { return num_documents_; }
  int64_t num_tokens() const { return num_tokens_; }

  int64_t sequence_length(int64_t i) const;
  int64_t sequence_pointer(int64_t i) const;  // byte offset in .bin
  // Sequences of document d are [document_start(d), document_start(d + 1)).
  int64_t document_start(int64_t d) const;
  int64_t document_length(int64_t d) const;  // tokens, summed over its sequences

  // Tokens [offset, offset + n) of sequence i, converted to int32 (a value that does not fit,
  // or a non-integral float, is an error naming the .bin file).
  void read_sequence(int64_t i, int64_t offset, int64_t n, int32_t* out) const;
  // Tokens [offset, offset + n) of document d, across its sequences.
  void read_document(int64_t d, int64_t offset, int64_t n, int32_t* out) const;
  std::vector<int32_t> document(int64_t d) const;

 private:
  IndexedDataset() = default;
  std::string prefix_;
  int dtype_code_ = 0;
  int64_t itemsize_ = 0;
  int64_t num_sequences_ = 0, num_documents_ = 0, num_tokens_ = 0;
  std::unique_ptr<detail::MappedFile> idx_, bin_;
  const char* lengths_ = nullptr;   // int32[S] inside the .idx mapping (maybe unaligned)
  const char* pointers_ = nullptr;  // int64[S]
  const char* doc_idx_ = nullptr;   // int64[D + 1]
};

// Writes PREFIX.bin/.idx. Tokens stream to PREFIX.bin.tmp; finalize() writes PREFIX.idx.tmp and
// renames both into place, so readers never see a half-written dataset. Without finalize() the
// destructor removes the temporaries.
class IndexedDatasetWriter {
 public:
  IndexedDatasetWriter(const std::string& prefix, int dtype_code);
  ~IndexedDatasetWriter();
  IndexedDatasetWriter(const IndexedDatasetWriter&) = delete;
  IndexedDatasetWriter& operator=(const IndexedDatasetWriter&) = delete;

  // One sequence that is a whole document (what Megatron's preprocess_data.py writes).
  void add_document(const std::vector<int32_t>& tokens);
  // Lower level: sequences, then end_document() closes the document holding those added since.
  void add_sequence(const int32_t* tokens, int64_t n);
  void end_document();
  void finalize();

  int64_t num_sequences() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_documents() const { return static_cast<int64_t>(doc_idx_.size()) - 1; }

 private:
  std::string prefix_;
  int dtype_code_;
  FILE* bin_ = nullptr;
  bool finalized_ = false;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> doc_idx_{0};
  std::vector<char> buf_;
};

}  // namespace ievo
