#include "launch/data_commands.h"

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "data/indexed_dataset.h"
#include "data/preprocess.h"

namespace ievo {

Subcommand add_preprocess_command(CLI::App& app) {
  auto o = std::make_shared<PreprocessOptions>();
  auto on_error = std::make_shared<std::string>("stop");
  auto quiet = std::make_shared<bool>(false);
  auto* c = app.add_subcommand(
      "preprocess",
      "Tokenize JSON-lines or text files with SentencePiece into a Megatron .bin/.idx dataset");
  c->add_option("--input", o->inputs,
                "input files: *.jsonl/*.json/*.ndjson = one JSON object per line; anything else "
                "= plain text, documents separated by blank lines")
      ->required()
      ->expected(1, -1);
  c->add_option("--output-prefix", o->output_prefix, "writes PREFIX.bin, PREFIX.idx, PREFIX.json")
      ->required();
  c->add_option("--tokenizer", o->tokenizer,
                "SentencePiece model (with --train-tokenizer: where the trained model is written)")
      ->required();
  c->add_option("--json-key", o->json_key, "key of the document text in each JSON line")
      ->capture_default_str();
  c->add_option("--workers", o->workers, "tokenizer threads")->capture_default_str()
      ->check(CLI::PositiveNumber);
  c->add_option("--train-tokenizer", o->train_tokenizer_vocab,
                "train a SentencePiece BPE model of this vocabulary size on the input first")
      ->check(CLI::PositiveNumber);
  c->add_option("--on-error", *on_error, "bad document: stop (error) or skip (report, leave out)")
      ->capture_default_str()
      ->check(CLI::IsMember({"skip", "stop"}));
  c->add_flag("--force", o->force, "redo even when the outputs are up to date");
  c->add_flag("--quiet", *quiet, "no progress line");
  return {c, [o, on_error, quiet] {
            o->on_error = *on_error == "skip" ? OnError::Skip : OnError::Stop;
            o->progress = !*quiet;
            const PreprocessResult r = preprocess(*o);
            if (r.up_to_date) {
              std::fprintf(stderr,
                           "ievo: %s.{bin,idx} up to date (%lld documents, %lld tokens); "
                           "nothing to do (--force to redo)\n",
                           o->output_prefix.c_str(), static_cast<long long>(r.documents),
                           static_cast<long long>(r.tokens));
              return;
            }
            std::fprintf(stderr,
                         "ievo: wrote %s.{bin,idx}: %lld documents, %lld tokens (%s, vocab %lld, "
                         "EOD id %d)%s\n",
                         o->output_prefix.c_str(), static_cast<long long>(r.documents),
                         static_cast<long long>(r.tokens), dtype_code_name(r.dtype_code),
                         static_cast<long long>(r.vocab_size), r.eod_id,
                         r.skipped ? (", " + std::to_string(r.skipped) + " bad documents skipped")
                                         .c_str()
                                   : "");
          }};
}

}  // namespace ievo
