#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <utility>

#include "runtime/error.h"

namespace ievo {

const char* pipeline_kind_name(PipelineKind k) {
  switch (k) {
    case PipelineKind::GPipe: return "gpipe";
    case PipelineKind::OneFOneB: return "1f1b";
    case PipelineKind::Interleaved: return "interleaved";
  }
  return "?";
}

PipelineKind pipeline_kind_from_name(const std::string& name) {
  if (name == "gpipe") return PipelineKind::GPipe;
  if (name == "1f1b") return PipelineKind::OneFOneB;
  if (name == "interleaved") return PipelineKind::Interleaved;
  IEVO_FAIL("parallel.schedule: unknown pipeline schedule '", name, "' (expected gpipe, 1f1b or interleaved)");
}

std::string PipeMessage::str() const {
  return detail::cat(grad ? "grad" : "act", "(mb ", micro, ", vs ", vstage, ")");
}

std::string PipeOp::str(bool with_chunk) const {
  if (type == Type::Exchange) {
    std::string s = "X[";
    for (size_t i = 0; i < transfers.size(); ++i) {
      const PipeTransfer& t = transfers[i];
      s += detail::cat(i ? ", " : "", t.send ? "send " : "recv ", t.msg.str(), t.send ? " > " : " < ", t.peer);
    }
    return s + "]";
  }
  std::string s = detail::cat(type == Type::Forward ? "F" : "B", micro);
  return with_chunk ? s + "." + std::to_string(chunk) : s;
}

namespace {

struct Compute {
  bool backward;
  int micro, chunk;
};

// Megatron's schedule table: (micro, chunk) of the k-th forward, walking groups of g micro-batches
// through every chunk (the last group takes whatever micro-batches are left).
std::vector<std::pair<int, int>> interleave_table(int m, int V, int g) {
  std::vector<std::pair<int, int>> t;
  for (int first = 0; first < m; first += g) {
    const int end = first + g >= m ? m : first + g;
    for (int c = 0; c < V; ++c)
      for (int mb = first; mb < end; ++mb) t.emplace_back(mb, c);
  }
  return t;
}

// The compute order of stage p, in units: the exchanges go between units (one compute each,
// but a steady-state forward + backward pair of the interleaved schedule, as in Megatron, which
// sends both outputs and receives both next inputs in one exchange after the pair).
std::vector<std::vector<Compute>> compute_units(const PipelineSchedule& s, int p) {
  const int P = s.stages, m = s.micro_batches, V = s.chunks;
  std::vector<std::vector<Compute>> out;
  if (s.forward_only) {  // the interleaved forward order: groups of P micro-batches per chunk
    for (const auto& [mb, c] : interleave_table(m, V, P)) out.push_back({{false, mb, c}});
    return out;
  }
  switch (s.kind) {
    case PipelineKind::GPipe:
      for (int i = 0; i < m; ++i) out.push_back({{false, i, 0}});
      for (int i = 0; i < m; ++i) out.push_back({{true, i, 0}});
      break;
    case PipelineKind::OneFOneB: {
      const int warmup = std::min(P - 1 - p, m);
      for (int i = 0; i < warmup; ++i) out.push_back({{false, i, 0}});
      for (int i = 0; i < m - warmup; ++i) {
        out.push_back({{false, warmup + i, 0}});
        out.push_back({{true, i, 0}});
      }
      for (int i = m - warmup; i < m; ++i) out.push_back({{true, i, 0}});
      break;
    }
    case PipelineKind::Interleaved: {
      const auto table = interleave_table(m, V, s.group);
      const int total = m * V;
      const int warmup = std::min(2 * (P - 1 - p) + (V - 1) * s.group, total);
      auto fwd = [&](int k) { return Compute{false, table[k].first, table[k].second}; };
      auto bwd = [&](int k) { return Compute{true, table[k].first, V - 1 - table[k].second}; };
      for (int k = 0; k < warmup; ++k) out.push_back({fwd(k)});
      for (int k = 0; k < total - warmup; ++k) out.push_back({fwd(warmup + k), bwd(k)});
      for (int k = total - warmup; k < total; ++k) out.push_back({bwd(k)});
      break;
    }
  }
  return out;
}

// Per stage: the compute units with exchanges between them (see the top of the header).
void derive_programs(PipelineSchedule& s) {
  const int P = s.stages;
  const int S = s.num_vstages();
  s.programs.assign(P, {});
  for (int p = 0; p < P; ++p) {
    std::vector<PipeOp>& prog = s.programs[p];
    std::vector<PipeTransfer> pending;  // sends of the last unit
    for (const auto& unit : compute_units(s, p)) {
      std::vector<PipeTransfer> x = std::move(pending);
      pending.clear();
      for (const Compute& c : unit) {  // receive what the unit needs
        const int v = s.vstage(p, c.chunk);
        if (!c.backward && v > 0) x.push_back({false, (v - 1) % P, {false, c.micro, v - 1}});
        if (c.backward && v < S - 1) x.push_back({false, (v + 1) % P, {true, c.micro, v + 1}});
      }
      if (!x.empty()) prog.push_back({PipeOp::Type::Exchange, -1, -1, std::move(x)});
      for (const Compute& c : unit) {  // compute, and send the outputs after the unit
        const int v = s.vstage(p, c.chunk);
        prog.push_back({c.backward ? PipeOp::Type::Backward : PipeOp::Type::Forward, c.micro, c.chunk, {}});
        if (!c.backward && v < S - 1) pending.push_back({true, (v + 1) % P, {false, c.micro, v}});
        if (c.backward && v > 0) pending.push_back({true, (v - 1) % P, {true, c.micro, v}});
      }
    }
    if (!pending.empty()) prog.push_back({PipeOp::Type::Exchange, -1, -1, std::move(pending)});
  }
}

}  // namespace

PipelineSchedule make_pipeline_schedule(PipelineKind kind, int P, int m, int V) {
  IEVO_CHECK(P >= 1, "parallel.pipeline must be >= 1, got ", P);
  IEVO_CHECK(V >= 1, "parallel.virtual_stages must be >= 1, got ", V);
  IEVO_CHECK(m >= 1, "a pipeline step needs at least one micro-batch, got ", m);
  if (V > 1) {
    IEVO_CHECK(kind == PipelineKind::Interleaved, "parallel.virtual_stages = ", V,
               " needs parallel.schedule: interleaved (", pipeline_kind_name(kind),
               " runs one model chunk per stage)");
    IEVO_CHECK(P > 1, "parallel.virtual_stages = ", V, " needs parallel.pipeline > 1");
  }
  if (kind == PipelineKind::Interleaved)
    IEVO_CHECK(m % P == 0, "parallel.schedule: interleaved needs the micro-batches per step to be a multiple "
               "of parallel.pipeline = ", P, " (as Megatron-LM's interleaved schedule), got ", m,
               " (micro-batches per step = train.global_batch_size / (train.micro_batch_size x "
               "data-parallel size))");
  PipelineSchedule s;
  s.kind = kind;
  s.stages = P;
  s.micro_batches = m;
  s.chunks = V;
  s.group = kind == PipelineKind::Interleaved ? P : m;
  derive_programs(s);
  return s;
}

PipelineSchedule make_forward_schedule(int P, int m, int V) {
  IEVO_CHECK(P >= 1 && m >= 1 && V >= 1 && (V == 1 || P > 1), "forward schedule: P ", P, ", m ", m, ", V ", V);
  PipelineSchedule s;
  s.kind = PipelineKind::GPipe;
  s.stages = P;
  s.micro_batches = m;
  s.chunks = V;
  s.group = m;
  s.forward_only = true;
  derive_programs(s);
  return s;
}

double pipeline_bubble(int P, int m, int V) {
  return static_cast<double>(P - 1) / static_cast<double>(m * V + P - 1);
}

ScheduleReport check_pipeline_schedule(const PipelineSchedule& s) {
  const int P = s.stages, m = s.micro_batches, V = s.chunks, S = s.num_vstages();
  IEVO_CHECK(static_cast<int>(s.programs.size()) == P, "pipeline schedule: ", s.programs.size(),
             " programs for ", P, " stages");
  auto where = [&](int p, size_t i) {
    return detail::cat("stage ", p, " op ", i, " (", s.programs[p][i].str(V > 1), ")");
  };

  // Pairing: the k-th message stage a sends to stage b is the k-th b receives from a.
  struct Ref {
    int stage;
    size_t op;
    PipeMessage msg;
  };
  std::map<std::pair<int, int>, std::vector<Ref>> sends, recvs;  // (from, to)
  for (int p = 0; p < P; ++p)
    for (size_t i = 0; i < s.programs[p].size(); ++i)
      for (const PipeTransfer& t : s.programs[p][i].transfers) {
        const PipeMessage& g = t.msg;
        IEVO_CHECK(t.peer >= 0 && t.peer < P && t.peer != p, where(p, i), ": bad peer ", t.peer);
        IEVO_CHECK(g.micro >= 0 && g.micro < m && g.vstage >= 0 && g.vstage < S, where(p, i),
                   ": message out of range");
        const int to = g.grad ? g.vstage - 1 : g.vstage + 1;  // receiving virtual stage
        IEVO_CHECK(to >= 0 && to < S, where(p, i), ": ", g.str(), " has no receiver");
        const int from_stage = g.vstage % P, to_stage = to % P;
        IEVO_CHECK(t.send ? (from_stage == p && to_stage == t.peer) : (to_stage == p && from_stage == t.peer),
                   where(p, i), ": ", g.str(), " goes from stage ", from_stage, " to ", to_stage);
        (t.send ? sends[{p, t.peer}] : recvs[{t.peer, p}]).push_back({p, i, g});
      }
  // partners[p][i]: the (stage, op) of every transfer's counterpart.
  std::vector<std::vector<std::vector<std::pair<int, size_t>>>> partners(P);
  for (int p = 0; p < P; ++p) partners[p].resize(s.programs[p].size());
  std::set<std::pair<int, int>> pairs;
  for (const auto& kv : sends) pairs.insert(kv.first);
  for (const auto& kv : recvs) pairs.insert(kv.first);
  for (const auto& key : pairs) {
    const auto& sv = sends[key];
    const auto& rv = recvs[key];
    for (size_t k = 0; k < std::max(sv.size(), rv.size()); ++k) {
      IEVO_CHECK(k < sv.size(), "stage ", key.second, " receives ", rv[k].msg.str(), " from stage ", key.first,
                 " (", where(rv[k].stage, rv[k].op), "), which never sends it");
      IEVO_CHECK(k < rv.size(), "stage ", key.first, " sends ", sv[k].msg.str(), " to stage ", key.second,
                 " (", where(sv[k].stage, sv[k].op), "), which never receives it");
      IEVO_CHECK(sv[k].msg == rv[k].msg, "message ", k, " from stage ", key.first, " to stage ", key.second,
                 ": sent as ", sv[k].msg.str(), " (", where(sv[k].stage, sv[k].op), ") but received as ",
                 rv[k].msg.str(), " (", where(rv[k].stage, rv[k].op), "): point-to-point messages match in order");
      partners[key.first][sv[k].op].push_back({key.second, rv[k].op});
      partners[key.second][rv[k].op].push_back({key.first, sv[k].op});
    }
  }

  // Simulation: computes in program order, each Exchange waits for all its partners to post.
  ScheduleReport rep;
  rep.max_in_flight.assign(P, 0);
  rep.exchanges.assign(P, 0);
  std::vector<size_t> pc(P, 0);
  std::vector<double> clock(P, 0), busy(P, 0);
  std::vector<std::vector<double>> posted(P);
  for (int p = 0; p < P; ++p) posted[p].assign(s.programs[p].size(), -1);
  std::vector<int> in_flight(P, 0);
  auto key = [](const PipeMessage& g) { return std::make_tuple(g.grad, g.micro, g.vstage); };
  std::vector<std::set<std::tuple<bool, int, int>>> inbox(P), outbox(P);
  std::vector<std::set<std::pair<int, int>>> fwd_done(P), bwd_done(P);
  for (bool progress = true; progress;) {
    progress = false;
    for (int p = 0; p < P; ++p) {
      const auto& prog = s.programs[p];
      while (pc[p] < prog.size()) {
        const size_t i = pc[p];
        const PipeOp& op = prog[i];
        if (op.type == PipeOp::Type::Exchange) {
          if (posted[p][i] < 0) posted[p][i] = clock[p];
          double done = posted[p][i];
          bool ready = true;
          for (auto [q, j] : partners[p][i]) {
            if (pc[q] < j) {
              ready = false;
              break;
            }
            if (posted[q][j] < 0) posted[q][j] = clock[q];  // q stands at j
            done = std::max(done, posted[q][j]);
          }
          if (!ready) break;
          for (const PipeTransfer& t : op.transfers) {
            if (t.send) {
              IEVO_CHECK(outbox[p].erase(key(t.msg)) == 1, where(p, i), ": sends ", t.msg.str(),
                         " before computing it");
            } else {
              IEVO_CHECK(inbox[p].insert(key(t.msg)).second, where(p, i), ": receives ", t.msg.str(), " twice");
            }
          }
          clock[p] = done;
          ++rep.exchanges[p];
        } else {
          const bool bw = op.type == PipeOp::Type::Backward;
          IEVO_CHECK(op.micro >= 0 && op.micro < m && op.chunk >= 0 && op.chunk < V, where(p, i),
                     ": micro-batch or chunk out of range");
          const int v = s.vstage(p, op.chunk);
          const auto mc = std::make_pair(op.micro, op.chunk);
          if (!bw) {
            IEVO_CHECK(fwd_done[p].insert(mc).second, where(p, i), ": forward runs twice");
            if (v > 0)
              IEVO_CHECK(inbox[p].erase(key({false, op.micro, v - 1})) == 1, where(p, i),
                         ": runs before its input ", PipeMessage{false, op.micro, v - 1}.str(), " arrived");
            if (v < S - 1) outbox[p].insert(key({false, op.micro, v}));
            if (!s.forward_only) rep.max_in_flight[p] = std::max(rep.max_in_flight[p], ++in_flight[p]);
          } else {
            IEVO_CHECK(!s.forward_only, where(p, i), ": a backward in a forward-only schedule");
            IEVO_CHECK(fwd_done[p].count(mc), where(p, i), ": backward before its forward");
            IEVO_CHECK(bwd_done[p].insert(mc).second, where(p, i), ": backward runs twice");
            if (v < S - 1)
              IEVO_CHECK(inbox[p].erase(key({true, op.micro, v + 1})) == 1, where(p, i),
                         ": runs before its output gradient ", PipeMessage{true, op.micro, v + 1}.str(), " arrived");
            if (v > 0) outbox[p].insert(key({true, op.micro, v}));
            --in_flight[p];
          }
          const double cost = bw ? 2 : 1;
          clock[p] += cost;
          busy[p] += cost;
        }
        ++pc[p];
        progress = true;
      }
    }
  }
  std::string stuck;
  for (int p = 0; p < P; ++p)
    if (pc[p] < s.programs[p].size()) stuck += "; " + where(p, pc[p]) + " waits";
  IEVO_CHECK(stuck.empty(), pipeline_kind_name(s.kind), " schedule (P ", P, ", m ", m, ", V ", V,
             ") deadlocks", stuck);
  for (int p = 0; p < P; ++p) {
    const int backwards = s.forward_only ? 0 : m * V;
    IEVO_CHECK(static_cast<int>(fwd_done[p].size()) == m * V && static_cast<int>(bwd_done[p].size()) == backwards,
               "stage ", p, " runs ", fwd_done[p].size(),
               " forwards and ", bwd_done[p].size(), " backwards; expected ", m * V, " and ", backwards);
    IEVO_CHECK(inbox[p].empty() && outbox[p].empty(), "stage ", p, ": ", inbox[p].size(),
               " messages received but unused, ", outbox[p].size(), " computed but never sent");
    int bound = m * V;  // gpipe: everything
    if (s.kind == PipelineKind::OneFOneB) bound = P - p;
    if (s.kind == PipelineKind::Interleaved) bound = std::min(m * V, 2 * (P - 1 - p) + (V - 1) * s.group + 1);
    IEVO_CHECK(rep.max_in_flight[p] <= bound, pipeline_kind_name(s.kind), " stage ", p, " holds ",
               rep.max_in_flight[p], " micro-batches in flight; at most ", bound, " allowed");
  }
  rep.makespan = *std::max_element(clock.begin(), clock.end());
  for (int p = 0; p < P; ++p) rep.bubble += (1 - busy[p] / rep.makespan) / P;
  return rep;
}

std::string format_pipeline_schedule(const PipelineSchedule& s, bool exchanges) {
  const ScheduleReport r = check_pipeline_schedule(s);
  std::ostringstream o;
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "pipeline schedule %s: P %d stages, m %d micro-batches, V %d chunks per stage", pipeline_kind_name(s.kind),
                s.stages, s.micro_batches, s.chunks);
  o << buf;
  if (s.kind == PipelineKind::Interleaved) o << " (groups of " << s.group << " micro-batches)";
  std::snprintf(buf, sizeof buf,
                "\n  bubble (P-1)/(m*V+P-1) = %.1f%%; simulated (forward 1, backward 2 per chunk): %.1f%% of %g\n",
                100 * pipeline_bubble(s.stages, s.micro_batches, s.chunks), 100 * r.bubble, r.makespan);
  o << buf;
  for (int p = 0; p < s.stages; ++p) {
    o << "  stage " << p << " (at most " << r.max_in_flight[p] << " in flight):";
    for (const PipeOp& op : s.programs[p]) {
      if (op.type == PipeOp::Type::Exchange && !exchanges) continue;
      o << " " << op.str(s.chunks > 1);
    }
    o << "\n";
  }
  return o.str();
}

std::vector<int64_t> pipeline_layer_split(const ModelConfig& c, int P, int V, int64_t seq_len,
                                          const std::vector<int64_t>& explicit_layers) {
  const int64_t L = c.num_layers;
  const int S = P * V;
  if (!explicit_layers.empty()) {
    IEVO_CHECK(static_cast<int>(explicit_layers.size()) == S, "parallel.pipeline_layers has ",
               explicit_layers.size(), " entries; expected parallel.pipeline x parallel.virtual_stages = ", P,
               " x ", V, " = ", S, " (blocks per virtual stage, in order)");
    int64_t sum = 0;
    for (size_t i = 0; i < explicit_layers.size(); ++i) {
      IEVO_CHECK(explicit_layers[i] >= 1, "parallel.pipeline_layers[", i, "] = ", explicit_layers[i],
                 ": every virtual stage needs at least one block");
      sum += explicit_layers[i];
    }
    IEVO_CHECK(sum == L, "parallel.pipeline_layers sums to ", sum, " blocks but model.num_layers is ", L);
    return explicit_layers;
  }
  IEVO_CHECK(S <= L, "parallel.pipeline x parallel.virtual_stages = ", P, " x ", V, " = ", S,
             " virtual stages, but the model has ", L,
             " layers (model.num_layers): each virtual stage needs at least one block");
  // Training FLOPs per token, divided by the common factor 6.
  const int64_t d = c.hidden_size;
  const int64_t block = d * (c.q_dim() + 2 * c.kv_dim()) + c.q_dim() * d + 3 * d * c.ffn_hidden_size + d * seq_len;
  const int64_t head = d * c.vocab_size, embed = d / 3;
  // best[g][i]: least possible maximum cost of the first g virtual stages holding blocks [0, i).
  constexpr int64_t kInf = std::numeric_limits<int64_t>::max();
  std::vector<std::vector<int64_t>> best(S + 1, std::vector<int64_t>(L + 1, kInf));
  std::vector<std::vector<int64_t>> from(S + 1, std::vector<int64_t>(L + 1, -1));
  best[0][0] = 0;
  for (int g = 1; g <= S; ++g)
    for (int64_t i = g; i <= L; ++i)
      for (int64_t j = i - 1; j >= g - 1; --j) {  // stage g-1 holds [j, i); larger j first: ties
        if (best[g - 1][j] == kInf) continue;   // give later stages fewer blocks
        const int64_t cost = (i - j) * block + (g == 1 ? embed : 0) + (g == S ? head : 0);
        const int64_t worst = std::max(best[g - 1][j], cost);
        if (worst < best[g][i]) best[g][i] = worst, from[g][i] = j;
      }
  std::vector<int64_t> split(S);
  for (int64_t g = S, i = L; g > 0; --g) {
    split[g - 1] = i - from[g][i];
    i = from[g][i];
  }
  return split;
}

ModelShard pipeline_shard(const std::vector<int64_t>& split, int P, int V, int stage) {
  IEVO_CHECK(static_cast<int>(split.size()) == P * V && stage >= 0 && stage < P, "pipeline_shard: ",
             split.size(), " virtual stages for P ", P, " x V ", V, ", stage ", stage);
  std::vector<int64_t> begin(split.size() + 1, 0);
  for (size_t v = 0; v < split.size(); ++v) begin[v + 1] = begin[v] + split[v];
  ModelShard sh;
  for (int c = 0; c < V; ++c) {
    const int v = c * P + stage;
    sh.chunks.push_back({begin[v], begin[v + 1]});
  }
  sh.first = stage == 0;
  sh.last = stage == P - 1;
  return sh;
}

}  // namespace ievo
