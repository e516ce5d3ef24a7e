// Sharded checkpoints (format version 3, docs/checkpoint-format.md): every rank writes the part
// of the training state it owns into its own file step_<N>/model-rank<R>.h5, and readers assemble
// global tensors from the pieces, so no rank ever holds the whole model while saving.
//
// A piece is the flat element range [begin, end) of a rank's local tensor, which is itself the
// slice {split_dim, split_offset} of the global tensor (models/shard.h; split_dim -1: the whole
// tensor). Under ZeRO a piece is one tensor's part of the rank's data-parallel shard. Replicated
// slices (norms under tensor parallelism, the tied embedding's pipeline copy) are written by one
// rank only. Each piece is a 1-D dataset with its offsets and a checksum of its bytes.
//
// The write is collective and atomic: every rank writes into step_<N>.tmp and fsyncs, the ranks
// agree that all succeeded, then rank 0 writes state.json (listing the shard files and the
// global tensors the pieces must cover) and config.json, renames step_<N>.tmp to step_<N> and
// updates `latest`. A failure on any rank is an error on every rank; step_<N>.tmp is removed and
// the previous checkpoint is untouched.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "launch/checkpoint.h"
#include "parallel/communicator.h"
#include "parallel/zero.h"

namespace ievo {

// One piece of one tensor (see above); data: one host 1-D tensor of end - begin elements per
// group (f32, or f64 for f64 state), in the order of the groups passed to the writer.
struct CheckpointPiece {
  std::string name;  // the global (HF) name
  Shape global_shape, local_shape;
  int split_dim = -1;
  int64_t split_offset = 0;
  int64_t begin = 0, end = 0;
  std::vector<Tensor> data;
};

// "model-rank00003.h5"
std::string shard_file_name(int rank);

// Collective over `world` (every rank calls it; begin + write + finish below; `writes`: this rank has a file to write, rank 0
// always does). global_specs: every tensor of the model (their global names and shapes), which
// the pieces of all ranks together must cover exactly once per group. Throws on every rank if the
// save failed anywhere (the message names the file on the rank that failed).
void save_sharded_checkpoint(const std::string& ckpt_dir, const ModelConfig& c,
                             const CheckpointState& state, const std::vector<std::string>& groups,
                             const std::vector<ParamSpec>& global_specs,
                             const std::vector<CheckpointPiece>& pieces, bool writes,
                             Communicator& world, bool update_latest = true);

// Which of this rank's local tensors (`mine`, model-parallel rank mp_rank) it writes: those that
// no lower model-parallel rank also holds (same global name and slice; specs_of(r): rank r's
// local specs). Replicated norms, replicated k/v heads and the tied embedding's copy are so
// written once.
std::vector<bool> owned_slices(const std::vector<ParamSpec>& mine, int mp_rank,
                               const std::function<std::vector<ParamSpec>(int)>& specs_of);

// One collective save in progress (the phases of save_sharded_checkpoint, for the asynchronous
// writer): begin (collective: step_<N>.tmp, the writers, state.json's checksum shared), the
// rank's own file (any thread), finish (collective: all files written? then state.json, rename,
// `latest`; `error`: this rank's write failure or "").
struct ShardedSave {
  std::string final_dir, tmp, file, state_text, config_text;
  std::vector<std::string> groups;
  uint64_t state_sum = 0, config_sum = 0;
  int64_t step = 0;
  int rank = 0, world_size = 1;
  bool writes = false, update_latest = true;
};
ShardedSave begin_sharded_save(const std::string& ckpt_dir, const ModelConfig& c,
                               const CheckpointState& state, const std::vector<std::string>& groups,
                               const std::vector<ParamSpec>& global_specs, bool writes,
                               Communicator& world, bool update_latest = true);
void write_sharded_file(const ShardedSave& sv, const std::vector<CheckpointPiece>& pieces);
void finish_sharded_save(const ShardedSave& sv, const std::string& error, Communicator& world);

// The trainer's checkpoints under several ranks: this rank's ZeRO segments of the master weights
// and Adam moments (host copies) of its owned local tensors (owned_slices), saved collectively as
// RUN_DIR/checkpoints/step_<N> (groups params, exp_avg, exp_avg_sq); `writes`: this rank holds
// state nobody else writes (ZeRO stages 1-3: every rank; stage 0: data-parallel rank 0). Rank 0
// applies keep_last once a checkpoint is complete and logs it.
//
// async (checkpoint.async): save() takes the host copy of this rank's pieces (1/N of the state),
// starts a thread writing its file and returns; poll(), called by every rank after every step,
// asks all ranks (one all-reduce while a save is in flight) whether their writes are done and,
// once they all are, finishes the save collectively; a failed write on any rank then fails every
// rank (step_<N>.tmp removed, the previous checkpoint untouched). The next save() and wait() (end
// of the run) finish the one in flight first. Without async save() does it all at once. Every
// method is collective over `world`.
class ShardedCheckpointer {
 public:
  ShardedCheckpointer(std::string run_dir, int64_t keep_last, bool async, Communicator& world);
  ~ShardedCheckpointer();  // joins a write in flight (not finished: its step_<N>.tmp stays)
  ShardedCheckpointer(const ShardedCheckpointer&) = delete;
  ShardedCheckpointer& operator=(const ShardedCheckpointer&) = delete;

  void save(const ModelConfig& c, const CheckpointState& state, ZeroOptimizer& zero,
            const std::vector<ParamSpec>& specs, const std::vector<bool>& owned, bool writes,
            const std::vector<ParamSpec>& global_specs);
  void poll();
  void wait();

 private:
  void finish();

  std::string run_dir_;
  int64_t keep_last_;
  bool async_;
  Communicator& world_;
  std::thread worker_;
  std::atomic<bool> done_{true};
  std::string error_;  // the background write's failure (read after join)
  std::unique_ptr<ShardedSave> pending_;
  std::vector<CheckpointPiece> pieces_;
  std::chrono::steady_clock::time_point started_;
  int64_t elems_ = 0;
};

// The shard files of a version 3 checkpoint, open for reading (CheckpointReader uses it).
// Opening checks that every listed file exists, is an ievo shard file of this checkpoint (the
// state.json / config.json checksums it records match those files' bytes) and holds the number of
// pieces it says; reading a tensor verifies every piece's checksum and that the pieces cover
// every element. Errors name the file and dataset.
class ShardSet {
 public:
  ShardSet(const std::string& dir, const nlohmann::json& state, uint64_t state_checksum,
           uint64_t config_checksum);
  ~ShardSet();
  ShardSet(const ShardSet&) = delete;
  ShardSet& operator=(const ShardSet&) = delete;

  std::vector<std::string> tensor_names() const;
  Tensor read(const std::string& group, const std::string& name) const;

 private:
  struct PieceRef {
    size_t file;
    Shape local_shape;
    int split_dim;
    int64_t split_offset, begin, end;
    size_t elem_size;
  };
  std::string dir_;
  std::vector<std::string> paths_;
  std::vector<int64_t> files_;  // hid_t
  std::map<std::string, Shape> shapes_;  // global tensors from state.json
  std::map<std::pair<std::string, std::string>, std::vector<PieceRef>> pieces_;  // (group, name)
};

}  // namespace ievo
