#include "models/generate.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace ievo {

int32_t sample_token(const std::vector<double>& z, const SamplingOptions& o, std::mt19937_64& rng) {
  IEVO_CHECK(!z.empty(), "sample_token: no logits");
  const int64_t V = static_cast<int64_t>(z.size());
  if (o.temperature <= 0)
    return static_cast<int32_t>(std::max_element(z.begin(), z.end()) - z.begin());
  IEVO_CHECK(o.top_p > 0 && o.top_p <= 1, "top_p must be in (0, 1], got ", o.top_p);
  IEVO_CHECK(o.top_k >= 0, "top_k must be >= 0, got ", o.top_k);
  // Tokens by probability, highest first (ties: lower id first).
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return z[a] > z[b]; });
  const double zmax = z[order[0]];
  std::vector<double> p(static_cast<size_t>(V));
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += p[i] = std::exp((z[order[i]] - zmax) / o.temperature);
  int64_t keep = o.top_k > 0 ? std::min(o.top_k, V) : V;
  if (o.top_p < 1) {
    double cum = 0;
    for (int64_t i = 0; i < keep; ++i) {
      cum += p[i] / sum;
      if (cum >= o.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (int64_t i = 0; i < keep; ++i) kept += p[i];
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * kept;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return order[i];
  }
  return order[keep - 1];  // u within rounding of the total
}

std::vector<int32_t> generate(Llama& model, const ParamStore& params, const std::vector<int32_t>& prompt,
                              const SamplingOptions& o, const std::function<void(int32_t)>& on_token) {
  IEVO_CHECK(!prompt.empty(), "generate: the prompt has no tokens");
  const int64_t limit = model.config().max_position_embeddings;
  IEVO_CHECK(static_cast<int64_t>(prompt.size()) < limit, "generate: the prompt has ", prompt.size(),
             " tokens, the model at most ", limit, " positions");
  const int64_t capacity =
      std::min<int64_t>(limit, static_cast<int64_t>(prompt.size()) + std::max<int64_t>(0, o.max_new_tokens));
  KvCache cache = model.make_kv_cache(capacity, params.dtype(), params.device());
  std::mt19937_64 rng(o.seed);
  std::vector<int32_t> out, step = prompt;
  // The sequence (prompt + new tokens) never exceeds the cache, so every token fed has a slot.
  const int64_t room = capacity - static_cast<int64_t>(prompt.size());
  while (static_cast<int64_t>(out.size()) < room) {
    const Tensor logits = model.forward_step(params, step, cache);
    const int32_t t = sample_token(
        logits.slice(0, logits.size(0) - 1, logits.size(0)).to_double_vector(), o, rng);
    out.push_back(t);
    if (on_token) on_token(t);
    if (t == o.stop_token) break;
    step = {t};
  }
  return out;
}

}  // namespace ievo
