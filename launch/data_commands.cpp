#include "launch/data_commands.h"

#include <sentencepiece_processor.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "data/indexed_dataset.h"
#include "data/preprocess.h"
#include "launch/checkpoint.h"
#include "launch/device.h"
#include "models/generate.h"

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

namespace {

struct GenerateArgs {
  std::string checkpoint, prompt, tokenizer, device = "cpu";
  SamplingOptions sampling;
  bool ignore_eos = false;
};

// Prints the text of the tokens as they come: the whole sequence is decoded again after each
// token and the new suffix printed (a multi-byte character shows once it is complete).
class TextStream {
 public:
  TextStream(const sentencepiece::SentencePieceProcessor* sp, std::vector<int32_t> ids)
      : sp_(sp), ids_(std::move(ids)) {
    shown_ = decode();
    std::fwrite(shown_.data(), 1, shown_.size(), stdout);
    std::fflush(stdout);
  }
  void add(int32_t t) {
    ids_.push_back(t);
    const std::string full = decode();
    if (full.compare(0, shown_.size(), shown_) != 0) return;  // wait for a stable prefix
    std::fwrite(full.data() + shown_.size(), 1, full.size() - shown_.size(), stdout);
    std::fflush(stdout);
    shown_ = full;
  }

 private:
  std::string decode() const {
    if (!sp_) return std::string(ids_.begin(), ids_.end());  // byte-level ids
    std::string s;
    const auto st = sp_->Decode(std::vector<int>(ids_.begin(), ids_.end()), &s);
    if (!st.ok()) IEVO_FAIL("decoding generated tokens: ", st.ToString());
    return s;
  }
  const sentencepiece::SentencePieceProcessor* sp_;
  std::vector<int32_t> ids_;
  std::string shown_;
};

void run_generate(const GenerateArgs& a) {
  // A checkpoint directory, or a run directory (its newest checkpoint).
  std::string dir = a.checkpoint;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "state.json")) {
    const std::string latest = latest_checkpoint(dir);
    if (latest.empty())
      IEVO_FAIL(dir, ": not a checkpoint directory (no state.json) nor a run directory with checkpoints");
    dir = latest;
  }
  const Device dev = a.device == "cuda" ? Device::CUDA : Device::CPU;
  if (dev == Device::CUDA) init_device(0);
  const ModelConfig mc = read_checkpoint_model_config(dir);
  ParamStore params(param_specs(mc), DType::F32, dev);
  CheckpointReader(dir).read_into("params", params);
  Llama model(mc);

  SamplingOptions so = a.sampling;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp;
  std::vector<int32_t> prompt;
  if (!a.tokenizer.empty()) {
    sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
    if (const auto st = sp->Load(a.tokenizer); !st.ok())
      IEVO_FAIL("tokenizer ", a.tokenizer, ": ", st.ToString());
    IEVO_CHECK(sp->GetPieceSize() <= mc.vocab_size, "tokenizer ", a.tokenizer, " has ",
               sp->GetPieceSize(), " pieces, more than the model's vocab_size ", mc.vocab_size);
    std::vector<int> ids;
    if (const auto st = sp->Encode(a.prompt, &ids); !st.ok())
      IEVO_FAIL("encoding the prompt: ", st.ToString());
    prompt.assign(ids.begin(), ids.end());
    if (!a.ignore_eos) so.stop_token = sp->eos_id();
  } else {
    IEVO_CHECK(mc.vocab_size >= 256, "the model's vocabulary (", mc.vocab_size,
               ") is not byte-level: pass --tokenizer MODEL.model");
    for (unsigned char c : a.prompt) prompt.push_back(c);
  }
  IEVO_CHECK(!prompt.empty(), "the prompt is empty");

  TextStream out(sp.get(), prompt);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<int32_t> gen = generate(model, params, prompt, so, [&](int32_t t) { out.add(t); });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\n");
  std::fflush(stdout);
  std::fprintf(stderr, "ievo: %zu prompt + %zu new tokens from %s in %.2f s (%.1f tok/s)\n",
               prompt.size(), gen.size(), dir.c_str(), s, static_cast<double>(gen.size()) / s);
}

}  // namespace

Subcommand add_generate_command(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  auto* c = app.add_subcommand("generate", "Sample text from a checkpoint (KV cache)");
  c->add_option("checkpoint", a->checkpoint,
                "checkpoint directory (RUN_DIR/checkpoints/step_N), or a run directory (its latest)")
      ->required();
  c->add_option("--prompt", a->prompt, "text to continue")->required();
  c->add_option("--tokenizer", a->tokenizer,
                "SentencePiece model; without it the prompt and output are bytes (byte-level models)");
  c->add_option("--max-new-tokens", a->sampling.max_new_tokens, "tokens to generate at most")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  c->add_option("--temperature", a->sampling.temperature, "0: greedy (argmax)")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  c->add_option("--top-k", a->sampling.top_k, "keep the K most likely tokens; 0: all")
      ->capture_default_str()->check(CLI::NonNegativeNumber);
  c->add_option("--top-p", a->sampling.top_p, "nucleus: the most likely tokens up to this mass")
      ->capture_default_str()->check(CLI::Range(1e-9, 1.0));
  c->add_option("--seed", a->sampling.seed, "sampling seed")->capture_default_str();
  c->add_option("--device", a->device, "cpu | cuda")->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  c->add_flag("--ignore-eos", a->ignore_eos, "do not stop at the tokenizer's </s>");
  return {c, [a] { run_generate(*a); }};
}

}  // namespace ievo
