// `ievo preprocess`: text -> SentencePiece tokens -> Megatron PREFIX.bin / PREFIX.idx.
//
// Input documents, by file name:
//   *.jsonl, *.json, *.ndjson   JSON lines: each non-blank line is one object and one document;
//                               its text is the string under `json_key` (as Megatron's
//                               preprocess_data.py does). Blank lines are skipped.
//   anything else               plain text: documents are separated by one or more blank lines
//                               (lines holding only spaces, tabs or '\r'); a document's text is
//                               its lines joined with '\n' (a trailing '\r' of a line is dropped).
// Every document is encoded with the SentencePiece model and gets the tokenizer's </s> (eos) id
// appended: that is the end-of-document token (EOD) that the sample sources see. The output holds
// one sequence per document, in input order (files in the order given, documents in file order),
// whatever the number of workers; the token dtype is uint16 when the vocabulary fits, else int32
// (best_dtype_code).
//
// Bad input, reported as "FILE:LINE: what" (LINE = the JSON line, or the first line of the text
// document): a line that is not valid UTF-8 (with the byte offset), invalid JSON, a JSON value
// that is not an object, a missing key or a non-string value under it, and an empty document
// (no non-whitespace character). on_error = Stop throws ievo::Error with the first problem in
// input order; Skip reports each (the first 20 on stderr) and leaves the document out.
// A missing input file or tokenizer is always an error naming the file.
//
// Atomic and resumable: the tokens go to PREFIX.bin.tmp / PREFIX.idx.tmp and are renamed into
// place when complete (IndexedDatasetWriter), then PREFIX.json (a manifest: the inputs' sizes and
// modification times, the tokenizer's checksum, the options, the counts) is written, also by
// rename. A run whose PREFIX.bin, PREFIX.idx and PREFIX.json exist and whose manifest matches the
// inputs, tokenizer and options does nothing ("up to date"), so an interrupted pipeline can
// simply be re-run; any mismatch, or a run that was interrupted (no manifest), starts over from
// the beginning of the inputs. Resume granularity is therefore the whole output, not an offset.
//
// With train_tokenizer_vocab = V > 0 a SentencePiece BPE model of V pieces is first trained on
// the input documents (Llama-style options: identity normalisation, whitespace kept, digits
// split, byte fallback; unk 0, <s> 1, </s> 2) and written to `tokenizer` (atomically); when the
// outputs are up to date and the tokenizer exists this step is skipped as well.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ievo {

enum class OnError { Skip, Stop };

struct PreprocessOptions {
  std::vector<std::string> inputs;
  std::string output_prefix;
  std::string tokenizer;             // SentencePiece .model (read, or written when training)
  std::string json_key = "text";
  int workers = 1;                   // tokenizer threads
  int64_t train_tokenizer_vocab = 0;  // > 0: train a BPE model of this size first
  OnError on_error = OnError::Stop;
  bool force = false;                // redo even when the outputs are up to date
  bool progress = true;              // progress line on stderr
};

struct PreprocessResult {
  int64_t documents = 0;    // written
  int64_t tokens = 0;       // written, EODs included
  int64_t skipped = 0;      // bad documents left out (on_error = Skip)
  int64_t bytes_read = 0;   // input bytes
  int64_t vocab_size = 0;
  int dtype_code = 0;
  int eod_id = -1;
  bool up_to_date = false;  // nothing was done
  bool trained_tokenizer = false;
  std::vector<std::string> problems;  // "FILE:LINE: what", in input order
};

PreprocessResult preprocess(const PreprocessOptions& opt);

// Trains the tokenizer alone (what preprocess does first with train_tokenizer_vocab > 0).
void train_tokenizer(const std::vector<std::string>& inputs, const std::string& json_key,
                     int64_t vocab_size, const std::string& model_path, int threads);

// Byte offset of the first invalid UTF-8 sequence in s (overlong forms, surrogates and code
// points above U+10FFFF are invalid), or -1 if s is valid UTF-8.
int64_t utf8_error_offset(const std::string& s);

}  // namespace ievo
