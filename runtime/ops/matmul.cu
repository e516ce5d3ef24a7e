// C = alpha op(A) op(B) + beta C on the GPU through cuBLASLt, row-major semantics of matmul.h.
//
// cuBLAS is column-major: a row-major [r, c] matrix with row stride ld is the column-major
// [c, r] matrix with leading dimension ld. So row-major C = op(A) op(B) is computed as the
// column-major product C^T = op(B)^T op(A)^T, i.e. cuBLAS "A" = our B and "B" = our A with the
// same transpose flags, m = N, n = M. Column slices (row stride > columns) pass ld = stride(0).
// f32 runs with CUBLAS_COMPUTE_32F (no TF32), bf16/f16 with fp32 accumulation; alpha/beta are
// fp32. Plans (descriptors + algorithm) are cached per shape, layout and alignment.
//
// Algorithm choice: cuBLASLt's heuristic ranks up to 8 algorithms (IEVO_GEMM_CANDIDATES); with
// autotuning (the default; IEVO_GEMM_AUTOTUNE=0 turns it off, and run.deterministic does, so that
// a run's algorithms never depend on timing noise) each candidate is timed once on the plan's
// first call with its real operands (1 warm-up + 3 runs, CUDA events) and the fastest is kept; the
// output is written to D itself when the real call overwrites it anyway (D overlaps no input and
// is not accumulated into), else to a scratch buffer. A GEMM that adds another matrix C (D = AB +
// C, the residual adds) has plans of its own, timed reading C: cuBLASLt runs another kernel for
// it, and reading C costs some candidates more than others. An accumulation in place (beta != 0,
// C = D) shares the plan of beta = 0, timed with beta = 0: its epilogue costs every candidate ~1%
// alike (docs/performance.md, fourteenth round), and timing it would need a scratch copy of D (an
// fp32 gradient, 0.7 GiB for InternLM2's head) at the step's peak. Without autotuning the
// heuristic's first choice is used.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "runtime/cuda/kernels.cuh"
#include "runtime/env.h"
#include "runtime/ops/cuda_ops.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/matmul.h"

namespace ievo::ops::cuda {
using namespace ievo::cuda;

namespace {

constexpr size_t kWorkspace = size_t{32} << 20;
constexpr int kMaxCandidates = 32;

// IEVO_GEMM_CANDIDATES: how many of cuBLASLt's heuristic candidates are timed (default 8, at most
// 32); IEVO_GEMM_TUNE_REPS / IEVO_GEMM_TUNE_ROUNDS: timed runs a candidate and rounds over the
// candidates (fastest_candidate; default 3 and 1); IEVO_GEMM_TUNE_LOG=1 prints every plan's
// candidates (their tile id, split-K count, launches and time; * the one kept).
int env_count(const char* name, int fallback) {
  const char* e = std::getenv(name);
  const int v = e ? std::atoi(e) : 0;
  return v > 0 ? v : fallback;
}

bool autotune() {
  static const bool env_on = env_switch_on("IEVO_GEMM_AUTOTUNE");
  return env_on && !ievo::cuda::deterministic();
}

struct PlanKey {
  int dtype, ta, tb;
  int64_t m, n, k, lda, ldb, ldc;
  int align_a, align_b, align_c;
  bool add_other;  // D = AB + C with C another matrix than D (beta 1)
  auto tie() const {
    return std::tie(dtype, ta, tb, m, n, k, lda, ldb, ldc, align_a, align_b, align_c, add_other);
  }
  bool operator<(const PlanKey& o) const { return tie() < o.tie(); }
};

struct Plan {
  std::string name;  // "m x n x k, NT" (ours), for IEVO_GEMM_TUNE_LOG
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool has_algo = false;  // false: use cublasGemmEx
};

struct Blas {
  std::mutex mu;
  cublasLtHandle_t lt = nullptr;
  cublasHandle_t blas = nullptr;
  std::map<PlanKey, Plan> plans;
  std::map<cudaStream_t, DeviceBuffer> workspace;  // one per stream: concurrent matmuls
};

Blas& blas() {
  static Blas* b = [] {
    auto* s = new Blas();  // leaked: used until exit
    IEVO_CUBLAS_CHECK(cublasLtCreate(&s->lt));
    IEVO_CUBLAS_CHECK(cublasCreate(&s->blas));
    IEVO_CUBLAS_CHECK(cublasSetMathMode(s->blas, CUBLAS_DEFAULT_MATH));  // no TF32
    return s;
  }();
  return *b;
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: IEVO_FAIL("matmul: dtype ", dtype_name(t), " is not supported on cuda (f32, bf16, f16)");
  }
}

int alignment(const void* p) {
  for (int a = 16; a > 1; a /= 2)
    if (aligned_to(p, a)) return a;
  return 1;
}


// The operands of the call that creates a plan, for timing the candidate algorithms.
struct Operands {
  const void* a;     // ours (cuBLAS "B")
  const void* b;     // ours (cuBLAS "A")
  const void* c_in;  // cuBLAS C: another matrix than d (PlanKey::add_other, timed with beta 1), or null
  void* d;           // cuBLAS D, the output
  bool d_writable;  // overwriting D loses nothing: it overlaps no input and is not accumulated into
  size_t c_bytes;   // extent of C and of D (same strides)
  cudaStream_t stream;
};

void* workspace(Blas& b, cudaStream_t s) {
  auto ws = b.workspace.find(s);
  if (ws == b.workspace.end()) ws = b.workspace.emplace(s, DeviceBuffer(kWorkspace)).first;
  return ws->second.data();
}

// What call(s) enqueues on stream s, as one letter a launch (k: kernel, m: memset, ?: other), by
// capturing it into a graph that is never run; empty if it cannot be captured.
template <typename Call>
std::string captured_launches(cudaStream_t s, Call&& call) {
  cudaGraph_t g = nullptr;
  if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return {};
  const bool ok = call(s);
  const bool captured = cudaStreamEndCapture(s, &g) == cudaSuccess && g;
  (void)cudaGetLastError();
  std::string out;
  size_t n = 0;
  if (ok && captured && cudaGraphGetNodes(g, nullptr, &n) == cudaSuccess) {
    std::vector<cudaGraphNode_t> nodes(n);
    cudaGraphGetNodes(g, nodes.data(), &n);
    for (cudaGraphNode_t node : nodes) {
      cudaGraphNodeType t = cudaGraphNodeTypeEmpty;
      cudaGraphNodeGetType(node, &t);
      out += t == cudaGraphNodeTypeKernel ? 'k' : t == cudaGraphNodeTypeMemset ? 'm' : '?';
    }
  }
  if (g) cudaGraphDestroy(g);
  return out;
}

// Index of the fastest of the candidates on the real operands (0 if none could be timed).
int fastest(Blas& b, const Plan& p, const cublasLtMatmulHeuristicResult_t* res, int count,
            const Operands& op) {
  DeviceBuffer scratch;
  void* d = op.d;
  if (!op.d_writable) {
    scratch = DeviceBuffer(op.c_bytes);
    d = scratch.data();
  }
  const void* c_in = op.c_in ? op.c_in : d;
  void* ws = workspace(b, op.stream);
  const float one = 1.0f, beta = op.c_in ? 1.0f : 0.0f;
  static const int reps = env_count("IEVO_GEMM_TUNE_REPS", 3), rounds = env_count("IEVO_GEMM_TUNE_ROUNDS", 1);
  static const bool log = env_count("IEVO_GEMM_TUNE_LOG", 0) > 0;
  auto run = [&](int i, cudaStream_t s) {  // candidate i once
    return res[i].state == CUBLAS_STATUS_SUCCESS && res[i].workspaceSize <= kWorkspace &&
           cublasLtMatmul(b.lt, p.desc, &one, op.b, p.la, op.a, p.lb, &beta, c_in, p.lc, d, p.lc,
                          &res[i].algo, ws, kWorkspace, s) == CUBLAS_STATUS_SUCCESS;
  };
  std::vector<float> times;
  const int best = fastest_candidate(count, op.stream, [&](int i) { return run(i, op.stream); }, &times,
                                     reps, rounds);
  if (log) {
    // What each candidate launches (k: a kernel, m: a memset), from one call captured into a graph
    // that never runs: every candidate of the large-M GEMMs launches a memset before its kernel
    // (docs/performance.md, fifteenth round).
    std::vector<std::string> launches(static_cast<size_t>(count));
    cudaStream_t cs = nullptr;
    IEVO_CUDA_CHECK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
    for (int i = 0; i < count; ++i)
      if (times[static_cast<size_t>(i)] < std::numeric_limits<float>::infinity())
        launches[static_cast<size_t>(i)] = captured_launches(cs, [&](cudaStream_t s) { return run(i, s); });
    IEVO_CUDA_CHECK(cudaStreamDestroy(cs));
    std::fprintf(stderr, "gemm plan %s: candidates (tile, splitk, launches: ms)", p.name.c_str());
    for (int i = 0; i < count; ++i) {
      int tile = -1, splitk = -1;
      size_t w = 0;
      cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &w);
      cublasLtMatmulAlgoConfigGetAttribute(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk), &w);
      std::fprintf(stderr, "%s %d,%d,%s: %.4f", i == best ? " *" : "  ", tile, splitk, launches[static_cast<size_t>(i)].c_str(), times[i]);
    }
    std::fprintf(stderr, "\n");
  }
  return best < 0 ? 0 : best;  // none ran: the heuristic's first
}

Plan make_plan(Blas& b, const PlanKey& key, cudaDataType_t dt, const Operands& op) {
  Plan p;
  p.name = std::to_string(key.m) + "x" + std::to_string(key.n) + "x" + std::to_string(key.k) + " " +
           (key.ta ? "T" : "N") + (key.tb ? "T" : "N") + (key.add_other ? " +C" : "");
  const cublasOperation_t opa = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS A = our B
  const cublasOperation_t opb = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS B = our A
  IEVO_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  IEVO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
  IEVO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
  // Stored column-major shapes: our B is [K, N] row-major (or [N, K] with tb) -> [N, K] ([K, N]).
  const int64_t m = key.n, n = key.m, k = key.k;
  IEVO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.la, dt, key.tb ? k : m, key.tb ? m : k, key.ldb));
  IEVO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lb, dt, key.ta ? n : k, key.ta ? k : n, key.lda));
  IEVO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.lc, dt, m, n, key.ldc));
  cublasLtMatmulPreference_t pref;
  IEVO_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const uint64_t ws = kWorkspace;
  const uint32_t al_a = key.align_b, al_b = key.align_a, al_c = key.align_c;
  IEVO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  IEVO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof(al_a)));
  IEVO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof(al_b)));
  IEVO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof(al_c)));
  IEVO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof(al_c)));
  cublasLtMatmulHeuristicResult_t res[kMaxCandidates] = {};
  int count = 0;
  const bool tune = autotune();
  static const int candidates = std::min(env_count("IEVO_GEMM_CANDIDATES", 8), kMaxCandidates);
  cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(b.lt, p.desc, p.la, p.lb, p.lc, p.lc, pref,
                                                     tune ? candidates : 1, res, &count);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && count > 0) {
    const int pick = tune && count > 1 ? fastest(b, p, res, count, op) : 0;
    if (res[pick].state == CUBLAS_STATUS_SUCCESS) {
      p.algo = res[pick].algo;
      p.has_algo = true;
    }
  }
  return p;
}

}  // namespace

namespace {

// c = alpha op(a) op(b) + beta cin, where cin (if given) has c's shape and strides; cin = nullptr
// means cin = c. cuBLASLt's C and D.
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor* cin, Tensor& c,
          float alpha, float beta) {
  const MatmulDims d = ops::matmul_dims(a, trans_a, b, trans_b, c);
  const void* c_in = cin ? cin->raw() : c.raw();
  const int64_t m = d.m, n = d.n, k = d.k, lda = d.lda, ldb = d.ldb, ldc = d.ldc;
  const cudaDataType_t dt = cuda_type(c.dtype());
  if (m == 0 || n == 0) return;
  if (k == 0) {  // op(A) op(B) = 0: C = beta C
    IEVO_CHECK(c.is_contiguous(), "matmul: K = 0 with a non-contiguous 'c' is not supported on cuda");
    if (cin && cin->raw() != c.raw()) c.copy_from(*cin);
    if (beta == 0.0f) c.zero_();
    else ops::scale(c, beta);
    return;
  }
  IEVO_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX, "matmul: dimensions too large");

  Blas& bl = blas();
  cudaStream_t stream = current_stream();
  std::lock_guard<std::mutex> lock(bl.mu);
  const bool add_other = beta != 0.0f && c_in != c.raw();
  const PlanKey key{static_cast<int>(c.dtype()), trans_a, trans_b, m, n, k, lda, ldb, ldc,
                    alignment(a.raw()), alignment(b.raw()),
                    std::min(alignment(c.raw()), alignment(c_in)), add_other};
  auto it = bl.plans.find(key);
  if (it == bl.plans.end()) {
    const size_t esize = dtype_size(c.dtype());
    const size_t c_bytes = static_cast<size_t>(ldc * (m - 1) + n) * esize;
    const char* clo = static_cast<const char*>(c.raw());
    auto overlaps = [&](const void* p, size_t bytes) {
      const char* lo = static_cast<const char*>(p);
      return lo < clo + c_bytes && clo < lo + bytes;
    };
    auto extent = [&](const Tensor& t, int64_t ld) {
      return static_cast<size_t>(ld * (t.size(0) - 1) + t.size(1)) * esize;
    };
    const bool writable = (beta == 0.0f || add_other) && !overlaps(a.raw(), extent(a, lda)) &&
                          !overlaps(b.raw(), extent(b, ldb)) && !(add_other && overlaps(c_in, c_bytes));
    const Operands op{a.raw(), b.raw(), add_other ? c_in : nullptr, c.raw(), writable, c_bytes, stream};
    it = bl.plans.emplace(key, make_plan(bl, key, dt, op)).first;
  }
  const Plan& p = it->second;
  const cublasOperation_t opa = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t opb = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  if (p.has_algo) {
    IEVO_CUBLAS_CHECK(cublasLtMatmul(bl.lt, p.desc, &alpha, b.raw(), p.la, a.raw(), p.lb, &beta,
                                     c_in, p.lc, c.raw(), p.lc, &p.algo, workspace(bl, stream),
                                     kWorkspace, stream));
  } else {
    if (c_in != c.raw()) {  // cublasGemmEx has no separate C: copy it into D first
      IEVO_CHECK(c.is_contiguous(), "matmul_add: the fallback GEMM needs a contiguous 'd'");
      c.copy_from(*cin);
    }
    IEVO_CUBLAS_CHECK(cublasSetStream(bl.blas, stream));
    IEVO_CUBLAS_CHECK(cublasGemmEx(bl.blas, opa, opb, static_cast<int>(n), static_cast<int>(m),
                                   static_cast<int>(k), &alpha, b.raw(), dt, static_cast<int>(ldb),
                                   a.raw(), dt, static_cast<int>(lda), &beta, c.raw(), dt,
                                   static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
}

}  // namespace

void matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, float alpha,
            float beta) {
  gemm(a, trans_a, b, trans_b, nullptr, c, alpha, beta);
}

void matmul_add(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, const Tensor& c, Tensor& d) {
  gemm(a, trans_a, b, trans_b, &c, d, 1.0f, 1.0f);
}

}  // namespace ievo::ops::cuda
