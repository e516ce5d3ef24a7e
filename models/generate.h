// Text generation with a KV cache (`ievo generate`): prefill the prompt in one forward_step, then
// one token per step. Device-agnostic: everything goes through the public ops via
// Llama::forward_step; only the logits of the last token come back to the host for sampling.
//
// Sampling of the next token from the last logits z (in double, on the host):
//   temperature <= 0: argmax (the lowest id among ties) -- greedy, deterministic;
//   else p = softmax(z / temperature), then
//     top_k > 0: keep the top_k most likely tokens (ties broken by lower id);
//     top_p < 1: keep the smallest set of most likely tokens whose probability sums to >= top_p;
//   renormalise and draw with u = (mt19937_64 output >> 11) * 2^-53 (seeded by `seed`, the
//   same sequence on every platform) by inverse CDF over the kept tokens in that order.
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "models/llama.h"

namespace ievo {

struct SamplingOptions {
  int64_t max_new_tokens = 100;
  double temperature = 1.0;
  int64_t top_k = 0;      // 0: off
  double top_p = 1.0;     // 1: off
  uint64_t seed = 0;
  int32_t stop_token = -1;  // generation ends after this token (e.g. </s>); -1: none
};

// The next token from one row of logits. rng is advanced once unless temperature <= 0.
int32_t sample_token(const std::vector<double>& logits, const SamplingOptions& o, std::mt19937_64& rng);

// Generates up to max_new_tokens after `prompt` (non-empty), fewer when stop_token comes (it is
// included) or the model's max_position_embeddings is reached. on_token is called with each new
// token as it is chosen. Returns the new tokens.
std::vector<int32_t> generate(Llama& model, const ParamStore& params, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o,
                              const std::function<void(int32_t)>& on_token = {});

}  // namespace ievo
