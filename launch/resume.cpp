#include "launch/resume.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "launch/log.h"
#include "models/atomic_file.h"
#include "runtime/error.h"

namespace fs = std::filesystem;

namespace ievo {

namespace {

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

// "step_12" -> 12; anything else -> -1.
int64_t step_of_name(const std::string& n) {
  if (n.size() <= 5 || n.size() > 23 || n.rfind("step_", 0) != 0) return -1;
  for (size_t i = 5; i < n.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(n[i]))) return -1;
  return std::stoll(n.substr(5));
}

// Loads `dir` and checks that its state agrees with its directory name.
CheckpointState load_checked(const std::string& dir, const CheckpointLoader& load) {
  CheckpointState st = load(dir);
  const int64_t named = step_of_name(fs::path(dir).filename().string());
  IEVO_CHECK(named < 0 || named == st.step, "checkpoint ", dir, "/state.json: step ", st.step,
             " does not match the directory name");
  return st;
}

// Candidates for auto, in order, with the reasons some directories were passed over.
std::vector<std::string> auto_candidates(const std::string& run_dir, std::vector<std::string>* notes) {
  const fs::path cdir = fs::path(run_dir) / "checkpoints";
  const auto all = list_checkpoints(run_dir);  // highest step first
  std::error_code ec;
  int64_t limit = INT64_MAX;
  std::vector<std::string> out;
  const fs::path latest = cdir / "latest";
  if (fs::exists(latest, ec)) {
    std::string name;
    try {
      name = trim(read_text_file(latest.string()));
    } catch (const Error& e) {
      notes->push_back(e.what());
    }
    const int64_t step = step_of_name(name);
    if (step < 0) {
      notes->push_back(latest.string() + " does not name a step_<N> directory ('" + name + "')");
    } else {
      limit = step;
      if (fs::is_directory(cdir / name, ec))
        out.push_back((cdir / name).string());
      else
        notes->push_back(latest.string() + " names " + name + ", which does not exist");
    }
  } else if (!all.empty()) {
    notes->push_back(latest.string() + " is missing");
  }
  for (auto& [step, path] : all) {
    if (step < limit) out.push_back(path);
    else if (step > limit)
      notes->push_back(path + " is newer than the one `latest` names: not a candidate");
  }
  return out;
}

void remove_leftovers(const std::string& run_dir) {
  std::error_code ec;
  for (auto& e : fs::directory_iterator(fs::path(run_dir) / "checkpoints", ec)) {
    const std::string n = e.path().filename().string();
    const bool tmp = n.size() > 4 && n.compare(n.size() - 4, 4, ".tmp") == 0 &&
                     step_of_name(n.substr(0, n.size() - 4)) >= 0;
    const bool deleting = n.rfind(".deleting-", 0) == 0;
    if ((tmp || deleting) && e.is_directory(ec)) {
      log_info("ievo: removing %s (left by an interrupted save or delete)", e.path().c_str());
      fs::remove_all(e.path(), ec);
    }
  }
}

}  // namespace

std::vector<std::string> changed_config_keys(const std::string& old_yaml, const std::string& new_yaml) {
  static const std::set<std::string> kFree = {"train.steps", "train.log_every", "train.max_time",
                                              "run.dir"};
  static const std::vector<std::string> kFreeSections = {"checkpoint.", "metrics.", "debug.",
                                                            "parallel."};
  YAML::Node a, b;
  try {
    a = YAML::Load(old_yaml);
    b = YAML::Load(new_yaml);
  } catch (const YAML::Exception&) {
    return {"(the checkpoint's config_yaml is not readable YAML)"};
  }
  auto flatten = [](const YAML::Node& root) {
    std::map<std::string, std::string> out;
    if (!root.IsMap()) return out;
    for (const auto& sec : root) {
      if (!sec.second.IsMap()) continue;
      for (const auto& kv : sec.second) {
        YAML::Emitter e;
        e << YAML::Flow << kv.second;
        out[sec.first.Scalar() + "." + kv.first.Scalar()] = e.c_str();
      }
    }
    return out;
  };
  const auto fa = flatten(a), fb = flatten(b);
  std::set<std::string> keys;
  for (auto& [k, v] : fa) keys.insert(k);
  for (auto& [k, v] : fb) keys.insert(k);
  std::vector<std::string> out;
  for (const auto& k : keys) {
    if (kFree.count(k)) continue;
    if (std::any_of(kFreeSections.begin(), kFreeSections.end(),
                    [&](const std::string& s) { return k.rfind(s, 0) == 0; }))
      continue;
    auto ia = fa.find(k), ib = fb.find(k);
    if (ia == fa.end() || ib == fb.end() || ia->second != ib->second) out.push_back(k);
  }
  return out;
}

void truncate_metrics(const std::string& run_dir, int64_t step) {
  const fs::path path = fs::path(run_dir) / "metrics.jsonl";
  std::error_code ec;
  if (!fs::exists(path, ec)) return;
  std::istringstream in(read_text_file(path.string()));
  std::string kept, line;
  int64_t dropped = 0;
  while (std::getline(in, line)) {
    if (in.eof()) {  // no newline at the end: torn by a crash
      ++dropped;
      break;
    }
    bool keep = false;
    try {
      auto j = nlohmann::json::parse(line);
      keep = j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step;
    } catch (const nlohmann::json::exception&) {
    }
    if (keep) kept += line + "\n";
    else ++dropped;
  }
  if (dropped > 0) write_file_atomic(path.string(), kept);
}

std::vector<int64_t> prune_checkpoints(const std::string& run_dir, int64_t newest, int64_t keep_last) {
  std::vector<int64_t> removed;
  if (keep_last <= 0) return removed;
  int64_t kept = 0;
  for (auto& [step, path] : list_checkpoints(run_dir)) {  // highest first
    if (step > newest) continue;
    if (++kept <= keep_last) continue;
    // Out of the way first (one rename), so a crash mid-delete leaves no half-deleted step_<N>.
    const fs::path aside = fs::path(path).parent_path() / (".deleting-" + fs::path(path).filename().string());
    std::error_code ec;
    fs::remove_all(aside, ec);
    fs::rename(path, aside, ec);
    if (ec) {
      log_info("ievo: warning: checkpoint.keep_last: cannot remove %s: %s", path.c_str(),
               ec.message().c_str());
      continue;
    }
    fs::remove_all(aside, ec);
    removed.push_back(step);
  }
  return removed;
}

std::optional<CheckpointState> resume_training(const Config& cfg, int rank,
                                               const CheckpointLoader& load) {
  const std::string& run_dir = cfg.run.dir;
  const std::string mode = cfg.checkpoint.resume;
  const fs::path cdir = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  std::optional<CheckpointState> st;
  std::string from;

  if (mode == "none") {
    const auto existing = list_checkpoints(run_dir);
    if (!existing.empty() || fs::exists(cdir / "latest", ec)) {
      IEVO_CHECK(cfg.checkpoint.overwrite, "checkpoint.resume: none, but ", cdir.string(),
                 " already has checkpoints (newest: ",
                 existing.empty() ? std::string("latest") : fs::path(existing[0].second).filename().string(),
                 "). To continue that run use checkpoint.resume: auto; to start over and delete "
                 "them add --set checkpoint.overwrite=true; or choose another run.dir");
      if (rank == 0) {
        log_info("ievo: checkpoint.overwrite: deleting %s and starting fresh", cdir.c_str());
        fs::remove_all(cdir, ec);
        IEVO_CHECK(!ec, "cannot delete ", cdir.string(), ": ", ec.message());
      }
    }
  } else if (mode == "auto") {
    std::vector<std::string> notes;
    const auto candidates = auto_candidates(run_dir, &notes);
    if (!candidates.empty() || !notes.empty())
      for (auto& n : notes) log_info("ievo: resume: %s", n.c_str());
    std::vector<std::string> failures;
    for (const auto& dir : candidates) {
      try {
        st = load_checked(dir, load);
        from = dir;
        break;
      } catch (const Error& e) {
        log_info("ievo: resume: skipping %s: %s", dir.c_str(), e.what());
        failures.push_back(e.what());
      }
    }
    if (!st && !failures.empty()) {
      std::string all;
      for (auto& f : failures) all += "\n  " + f;
      IEVO_FAIL("checkpoint.resume: auto: none of the checkpoints in ", cdir.string(),
                " could be loaded:", all,
                "\nFix or move them, or start over with checkpoint.resume: none and "
                "checkpoint.overwrite: true");
    }
  } else {
    try {
      st = load_checked(mode, load);
    } catch (const Error& e) {
      IEVO_FAIL("checkpoint.resume: ", mode, ": ", e.what());
    }
    from = mode;
  }

  if (st) {
    log_info("ievo: resuming from %s: step %lld, %lld samples consumed", from.c_str(),
             static_cast<long long>(st->step), static_cast<long long>(st->consumed_samples));
    const auto changed = changed_config_keys(st->config_yaml, config_to_yaml(cfg));
    if (!changed.empty()) {
      std::string keys;
      for (auto& k : changed) keys += (keys.empty() ? "" : ", ") + k;
      log_info("ievo: warning: the config differs from the checkpoint's in: %s", keys.c_str());
    }
    for (auto& [step, path] : list_checkpoints(run_dir))
      if (step > st->step && rank == 0) {
        log_info("ievo: note: %s is newer than the resumed step; it will be replaced when "
                 "training reaches that step", path.c_str());
        break;
      }
  }
  if (rank == 0) {
    remove_leftovers(run_dir);
    truncate_metrics(run_dir, st ? st->step : 0);
  }
  return st;
}

}  // namespace ievo
