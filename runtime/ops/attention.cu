// Causal GQA attention over packed sequences on the GPU (see attention.h).
// Backends (ops::attention_backend()):
//   Flash: bf16 or f16 with hd 64/128 -> ievo's tensor-core kernels (cuda/flash_attn.cu); any
//          other case (f32, other head dims up to 256) -> the generic kernels below;
//   Cudnn: cuDNN SDPA (cuda/cudnn_attention.cpp), bf16 or f16; f32 falls back to Flash;
//   Auto:  cuDNN when compiled in, usable on this GPU and the dtype is bf16/f16, else Flash.
// Generic kernels: one warp per (token, head), the head dim spread over the lanes (hd <= 256),
// fp32 math with exp/log as the CPU reference; the backward computes D = rowsum(dO * O), then
// dq per (query, head) and dk/dv per (key, kv head) looping over the group's query heads, so no
// atomics are needed and results are bit-identical run to run.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "runtime/cuda/attention_aux.h"
#include "runtime/cuda/cudnn_attention.h"
#include "runtime/cuda/flash_attn.h"
#include "runtime/cuda/kernels.cuh"
#include "runtime/ops/attention.h"
#include "runtime/ops/cuda_ops.h"

namespace ievo::cuda::attn {
namespace {

__global__ void ragged_aux_kernel(const int32_t* cu, int n, int padded, OffsetMuls mul, bool off64,
                                  int32_t* seq_len, OffsetPtrs off) {
  pdl_begin();
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s > padded) return;
  if (s < padded) seq_len[s] = s < n ? cu[s + 1] - cu[s] : 0;
  const int64_t start = cu[s < n ? s : n];
#pragma unroll
  for (int i = 0; i < kOffsets; ++i) {
    if (off64) static_cast<int64_t*>(off.v[i])[s] = start * mul.v[i];
    else static_cast<int32_t*>(off.v[i])[s] = static_cast<int32_t>(start * mul.v[i]);
  }
}

// Sequence index of token i: the largest s with cu[s] <= i.
__device__ __forceinline__ int find_seq(const int32_t* cu, int num_seqs, int i) {
  int lo = 0, hi = num_seqs;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (cu[mid] <= i) lo = mid;
    else hi = mid;
  }
  return lo;
}

template <bool kToPacked>
__global__ void stats_kernel(const float* src, const int32_t* cu, int num_seqs, int heads,
                             int smax, int n_tokens, float* dst) {
  pdl_begin();
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(heads) * n_tokens) return;
  const int h = static_cast<int>(idx / n_tokens), i = static_cast<int>(idx % n_tokens);
  const int s = find_seq(cu, num_seqs, i);
  const int64_t padded = (static_cast<int64_t>(s) * heads + h) * smax + (i - cu[s]);
  if (kToPacked) dst[idx] = src[padded];
  else dst[padded] = src[idx];
}

}  // namespace

void build_ragged_aux(const int32_t* cu, int num_seqs, int padded_seqs, OffsetMuls mul, bool off64,
                      int32_t* seq_len, OffsetPtrs off, cudaStream_t s) {
  launch_kernel("ragged_aux_kernel", ragged_aux_kernel, (padded_seqs + 1 + 127) / 128, 128, 0, s, cu,
                num_seqs, padded_seqs, mul, off64, seq_len, off);
}

void padded_to_packed(const float* stats, const int32_t* cu, int num_seqs, int heads, int smax,
                      int n_tokens, float* lse, cudaStream_t s) {
  const int64_t n = static_cast<int64_t>(heads) * n_tokens;
  launch_kernel("stats_kernel", stats_kernel<true>, grid_for(n, 256, INT32_MAX), 256, 0, s, stats, cu,
                num_seqs, heads, smax, n_tokens, lse);
}

void packed_to_padded(const float* lse, const int32_t* cu, int num_seqs, int heads, int smax,
                      int n_tokens, float* stats, cudaStream_t s) {
  const int64_t n = static_cast<int64_t>(heads) * n_tokens;
  launch_kernel("stats_kernel", stats_kernel<false>, grid_for(n, 256, INT32_MAX), 256, 0, s, lse, cu,
                num_seqs, heads, smax, n_tokens, stats);
}

}  // namespace ievo::cuda::attn

namespace ievo::ops::cuda {
using namespace ievo::cuda;
using ievo::cuda::attn::find_seq;

namespace {

constexpr int kWarpsPerBlock = 4;

struct GenParams {
  const int32_t* cu;
  int num_seqs, n_tokens, hq, hkv, hd;
  float scale;
};

// Lane's share of a head vector: elements lane + 32 k (k < KD) that are < hd.
template <typename T, int KD>
__device__ __forceinline__ void load_head(float (&r)[KD], const T* p, int hd, int lane) {
#pragma unroll
  for (int k = 0; k < KD; ++k) {
    const int d = lane + 32 * k;
    r[k] = d < hd ? to_f(p[d]) : 0.f;
  }
}
template <typename T, int KD>
__device__ __forceinline__ float dot_head(const float (&r)[KD], const T* p, int hd, int lane) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < KD; ++k) {
    const int d = lane + 32 * k;
    if (d < hd) s += r[k] * to_f(p[d]);
  }
  return warp_sum(s);
}

__device__ __forceinline__ int64_t warp_id() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
}

template <typename T, int KD>
__global__ void gen_fwd(GenParams p, const T* q, const T* k, const T* v, T* out, float* lse) {
  pdl_begin();
  const int64_t w = warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.n_tokens) * p.hq) return;
  const int i = static_cast<int>(w / p.hq), h = static_cast<int>(w % p.hq);
  const int kvh = h / (p.hq / p.hkv);
  const int b = p.cu[find_seq(p.cu, p.num_seqs, i)];
  float qr[KD], o[KD];
  load_head<T, KD>(qr, q + (static_cast<int64_t>(i) * p.hq + h) * p.hd, p.hd, lane);
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) o[kk] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int j = b; j <= i; ++j) {
    const int64_t off = (static_cast<int64_t>(j) * p.hkv + kvh) * p.hd;
    const float s = dot_head<T, KD>(qr, k + off, p.hd, lane) * p.scale;
    const float mn = fmaxf(m, s);
    const float corr = expf(m - mn), e = expf(s - mn);
    l = l * corr + e;
    const T* vj = v + off;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      const int d = lane + 32 * kk;
      o[kk] = o[kk] * corr + (d < p.hd ? e * to_f(vj[d]) : 0.f);
    }
    m = mn;
  }
  T* orow = out + (static_cast<int64_t>(i) * p.hq + h) * p.hd;
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    const int d = lane + 32 * kk;
    if (d < p.hd) orow[d] = from_f<T>(o[kk] / l);
  }
  if (lane == 0) lse[static_cast<int64_t>(h) * p.n_tokens + i] = m + logf(l);
}

// D[h, i] = dO_i . O_i
template <typename T, int KD>
__global__ void gen_delta(GenParams p, const T* dout, const T* out, float* delta) {
  pdl_begin();
  const int64_t w = warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.n_tokens) * p.hq) return;
  const int i = static_cast<int>(w / p.hq), h = static_cast<int>(w % p.hq);
  const int64_t off = (static_cast<int64_t>(i) * p.hq + h) * p.hd;
  float r[KD];
  load_head<T, KD>(r, dout + off, p.hd, lane);
  const float d = dot_head<T, KD>(r, out + off, p.hd, lane);
  if (lane == 0) delta[static_cast<int64_t>(h) * p.n_tokens + i] = d;
}

template <typename T, int KD>
__global__ void gen_bwd_dq(GenParams p, const T* q, const T* k, const T* v, const T* dout,
                           const float* lse, const float* delta, T* dq) {
  pdl_begin();
  const int64_t w = warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.n_tokens) * p.hq) return;
  const int i = static_cast<int>(w / p.hq), h = static_cast<int>(w % p.hq);
  const int kvh = h / (p.hq / p.hkv);
  const int b = p.cu[find_seq(p.cu, p.num_seqs, i)];
  const int64_t qoff = (static_cast<int64_t>(i) * p.hq + h) * p.hd;
  float qr[KD], gr[KD], acc[KD];
  load_head<T, KD>(qr, q + qoff, p.hd, lane);
  load_head<T, KD>(gr, dout + qoff, p.hd, lane);
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) acc[kk] = 0.f;
  const float lse_i = lse[static_cast<int64_t>(h) * p.n_tokens + i];
  const float d_i = delta[static_cast<int64_t>(h) * p.n_tokens + i];
  for (int j = b; j <= i; ++j) {
    const int64_t off = (static_cast<int64_t>(j) * p.hkv + kvh) * p.hd;
    const float pj = expf(dot_head<T, KD>(qr, k + off, p.hd, lane) * p.scale - lse_i);
    const float ds = pj * (dot_head<T, KD>(gr, v + off, p.hd, lane) - d_i);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      const int d = lane + 32 * kk;
      if (d < p.hd) acc[kk] += ds * to_f(k[off + d]);
    }
  }
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    const int d = lane + 32 * kk;
    if (d < p.hd) dq[qoff + d] = from_f<T>(acc[kk] * p.scale);
  }
}

template <typename T, int KD>
__global__ void gen_bwd_dkdv(GenParams p, const T* q, const T* k, const T* v, const T* dout,
                             const float* lse, const float* delta, T* dk, T* dv) {
  pdl_begin();
  const int64_t w = warp_id();
  const int lane = threadIdx.x & 31;
  if (w >= static_cast<int64_t>(p.n_tokens) * p.hkv) return;
  const int j = static_cast<int>(w / p.hkv), kvh = static_cast<int>(w % p.hkv);
  const int e = p.cu[find_seq(p.cu, p.num_seqs, j) + 1];
  const int64_t koff = (static_cast<int64_t>(j) * p.hkv + kvh) * p.hd;
  float kr[KD], vr[KD], dka[KD], dva[KD];
  load_head<T, KD>(kr, k + koff, p.hd, lane);
  load_head<T, KD>(vr, v + koff, p.hd, lane);
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) dka[kk] = dva[kk] = 0.f;
  const int rep = p.hq / p.hkv;
  for (int h = kvh * rep; h < (kvh + 1) * rep; ++h) {
    for (int i = j; i < e; ++i) {
      const int64_t qoff = (static_cast<int64_t>(i) * p.hq + h) * p.hd;
      const int64_t li = static_cast<int64_t>(h) * p.n_tokens + i;
      const float pj = expf(dot_head<T, KD>(kr, q + qoff, p.hd, lane) * p.scale - lse[li]);
      const float ds = pj * (dot_head<T, KD>(vr, dout + qoff, p.hd, lane) - delta[li]);
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        const int d = lane + 32 * kk;
        if (d < p.hd) {
          dva[kk] += pj * to_f(dout[qoff + d]);
          dka[kk] += ds * to_f(q[qoff + d]);
        }
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < KD; ++kk) {
    const int d = lane + 32 * kk;
    if (d < p.hd) {
      dk[koff + d] = from_f<T>(dka[kk] * p.scale);
      dv[koff + d] = from_f<T>(dva[kk]);
    }
  }
}

// Calls f(std::integral_constant<int, KD>) with KD = lanes' share of hd (1, 2, 4 or 8).
template <typename F>
void dispatch_kd(int64_t hd, F&& f) {
  if (hd <= 32) f(std::integral_constant<int, 1>{});
  else if (hd <= 64) f(std::integral_constant<int, 2>{});
  else if (hd <= 128) f(std::integral_constant<int, 4>{});
  else if (hd <= 256) f(std::integral_constant<int, 8>{});
  else IEVO_FAIL("attention: head dim ", hd, " > 256 is not supported on cuda");
}

unsigned warp_grid(int64_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// ---- argument checks and cu_seqlens ----
struct Dims {
  int64_t n, hq, hkv, hd;
};

Dims check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  expect_cuda_rows(q, "q", op);
  expect_cuda_rows(k, "k", op);
  expect_cuda_rows(v, "v", op);
  expect_dtype_in(q, "q", op, {DType::F32, DType::BF16, DType::F16});
  IEVO_CHECK(q.dim() == 3, op, ": tensor 'q' must be [N, Hq, hd], has shape ", shape_str(q.shape()));
  IEVO_CHECK(k.dim() == 3, op, ": tensor 'k' must be [N, Hkv, hd], has shape ", shape_str(k.shape()));
  Dims d{q.size(0), q.size(1), k.size(1), q.size(2)};
  check_shape(k, {d.n, d.hkv, d.hd}, "k");
  check_shape(v, {d.n, d.hkv, d.hd}, "v");
  check_dtype(k, q.dtype(), "k");
  check_dtype(v, q.dtype(), "v");
  IEVO_CHECK(d.hkv > 0 && d.hq % d.hkv == 0, op, ": query heads ", d.hq,
             " not a multiple of kv heads ", d.hkv);
  IEVO_CHECK(d.n < INT32_MAX / std::max<int64_t>(d.hq, 1), op, ": too many tokens");
  return d;
}

// rows: the tensor may have any row stride (q, k, v and their gradients), else it is packed.
void check_like(const Tensor& t, const Shape& shape, DType dt, const char* name, const char* op,
                bool rows = false) {
  if (rows) expect_cuda_rows(t, name, op);
  else expect_cuda(t, name, op);
  check_shape(t, shape, name);
  check_dtype(t, dt, name);
}

bool all_packed(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (!t->is_contiguous()) return false;
  return true;
}
Tensor packed(const Tensor& t) { return t.is_contiguous() ? t : t.clone(); }
// cuDNN takes strided rows 16-byte aligned: each start and row stride.
bool cudnn_rows(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    const bool aligned = aligned_to(t->raw(), 16) && t->row_stride() * dtype_size(t->dtype()) % 16 == 0;
    if (!t->is_contiguous() && !aligned) return false;
  }
  return true;
}

// cu_seqlens on the device. A host tensor is validated on the host and copied; a device
// tensor is validated with one round trip (cu[0] = 0, non-decreasing, lengths <= max_seqlen,
// cu[S] = N), since a longer sequence than max_seqlen would silently be cut by the launch grid.
struct CuSeqlens {
  DeviceBuffer copy;
  const int32_t* dev = nullptr;
  int num_seqs = 0;
  int uniform_len = 0;  // > 0: known on the host that every sequence has this length
};

// The common length of all sequences, or 0 if they differ.
int uniform_length(const int32_t* p, int num_seqs) {
  if (num_seqs < 1) return 0;
  const int len = p[1] - p[0];
  for (int s = 1; s < num_seqs; ++s)
    if (p[s + 1] - p[s] != len) return 0;
  return len;
}

__global__ void check_cu_kernel(const int32_t* cu, int num_seqs, int n, int max_seqlen, int* bad) {
  pdl_begin();
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  if (s == 0 && (cu[0] != 0 || cu[num_seqs] != n)) *bad = 1;
  if (s < num_seqs) {
    const int len = cu[s + 1] - cu[s];
    if (len < 0 || len > max_seqlen) *bad = 1;
  }
}

void validate_cu_host(const int32_t* p, int num_seqs, int64_t n, int max_seqlen, const char* op) {
  IEVO_CHECK(p[0] == 0, op, ": cu_seqlens[0] is ", p[0], ", expected 0");
  for (int s = 0; s < num_seqs; ++s) {
    const int64_t len = static_cast<int64_t>(p[s + 1]) - p[s];
    IEVO_CHECK(len >= 0, op, ": cu_seqlens decreases at ", s + 1, " (", p[s], " -> ", p[s + 1], ")");
    IEVO_CHECK(len <= max_seqlen, op, ": sequence ", s, " has length ", len, " > max_seqlen ",
               max_seqlen);
  }
  IEVO_CHECK(p[num_seqs] == n, op, ": cu_seqlens ends at ", p[num_seqs], " but there are ", n,
             " tokens");
}

// cu_host (optional, with a device cu): the same values on the host, so nothing is read back.
CuSeqlens prepare_cu(const Tensor& cu, const Tensor& cu_host, int64_t n, int max_seqlen, const char* op) {
  IEVO_CHECK(cu.defined(), op, ": tensor 'cu_seqlens' is undefined");
  check_dtype(cu, DType::I32, "cu_seqlens");
  IEVO_CHECK(cu.dim() == 1 && cu.numel() >= 1, op, ": tensor 'cu_seqlens' must be [S+1], has shape ",
             shape_str(cu.shape()));
  IEVO_CHECK(cu.is_contiguous(), op, ": tensor 'cu_seqlens' must be contiguous");
  IEVO_CHECK(max_seqlen >= 0, op, ": max_seqlen ", max_seqlen, " < 0");
  CuSeqlens r;
  r.num_seqs = static_cast<int>(cu.numel() - 1);
  cudaStream_t s = current_stream();
  const Tensor& host = cu.is_cpu() ? cu : cu_host;
  if (host.defined()) {
    IEVO_CHECK(host.is_cpu() && host.dtype() == DType::I32 && host.is_contiguous() &&
                   host.numel() == cu.numel(), op, ": tensor 'cu_seqlens_host' must be the host copy of "
               "cu_seqlens (", cu.numel(), " contiguous i32 on the cpu), has shape ",
               shape_str(host.shape()), " on ", device_name(host.device()));
    validate_cu_host(host.data<int32_t>(), r.num_seqs, n, max_seqlen, op);
    r.uniform_len = uniform_length(host.data<int32_t>(), r.num_seqs);
    if (!cu.is_cpu()) {
      r.dev = cu.data<int32_t>();
      return r;
    }
    r.copy = DeviceBuffer(cu.nbytes());
    IEVO_CUDA_CHECK(cudaMemcpyAsync(r.copy.data(), cu.raw(), cu.nbytes(), cudaMemcpyHostToDevice, s));
    r.dev = r.copy.as<int32_t>();
    return r;
  }
  r.dev = cu.data<int32_t>();
  DeviceBuffer flag(sizeof(int));
  IEVO_CUDA_CHECK(cudaMemsetAsync(flag.data(), 0, sizeof(int), s));
  launch_kernel("check_cu_kernel", check_cu_kernel, (r.num_seqs + 128) / 128, 128, 0, s, r.dev, r.num_seqs,
                static_cast<int>(n), max_seqlen, flag.as<int>());
  int bad = 0;
  IEVO_CUDA_CHECK(cudaMemcpyAsync(&bad, flag.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
  IEVO_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad) {
    std::vector<int32_t> host(cu.numel());
    IEVO_CUDA_CHECK(cudaMemcpy(host.data(), r.dev, cu.nbytes(), cudaMemcpyDeviceToHost));
    validate_cu_host(host.data(), r.num_seqs, n, max_seqlen, op);
    IEVO_FAIL(op, ": invalid cu_seqlens");
  }
  return r;
}

enum class Impl { Flash, Generic, Cudnn };

Impl choose(DType dt, int64_t hd, const char* op) {
  const AttentionBackend b = attention_backend();
  bool cudnn_ok = false;
  std::string why = "not compiled in (cudnn_frontend.h not found at configure time)";
#ifdef IEVO_HAVE_CUDNN_FRONTEND
  cudnn_ok = cudnn_attn::usable(&why) && cudnn_attn::supports_head_dim(hd);
  if (!cudnn_attn::supports_head_dim(hd)) why = detail::cat("head dim ", hd, " not supported");
#endif
  const bool half = dt == DType::BF16 || dt == DType::F16;  // the tensor-core kernels' types
  if (b == AttentionBackend::Cudnn && half) {
    IEVO_CHECK(cudnn_ok, op, ": cuDNN attention requested but unavailable: ", why);
    return Impl::Cudnn;
  }
  if (b == AttentionBackend::Auto && half && cudnn_ok) return Impl::Cudnn;
  if (half && flash::supported(static_cast<int>(hd))) return Impl::Flash;
  return Impl::Generic;
}

flash::Params flash_params(const Tensor& q, const Tensor& k, const Tensor& v, const CuSeqlens& cu,
                           int max_seqlen, const Dims& d) {
  return flash::Params{q.raw(), k.raw(), v.raw(), cu.dev, cu.num_seqs, max_seqlen,
                       static_cast<int>(d.n), static_cast<int>(d.hq), static_cast<int>(d.hkv),
                       static_cast<int>(d.hd), static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.hd))),
                       q.dtype() == DType::F16};
}

GenParams gen_params(const CuSeqlens& cu, const Dims& d) {
  return GenParams{cu.dev, cu.num_seqs, static_cast<int>(d.n), static_cast<int>(d.hq),
                   static_cast<int>(d.hkv), static_cast<int>(d.hd),
                   static_cast<float>(1.0 / std::sqrt(static_cast<double>(d.hd)))};
}

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                       int max_seqlen, Tensor& out, Tensor& lse, const Tensor& cu_seqlens_host) {
  const char* op = "attention_forward";
  const Dims d = check_qkv(q, k, v, op);
  check_like(out, q.shape(), q.dtype(), "out", op);
  check_like(lse, {d.hq, d.n}, DType::F32, "lse", op);
  const Impl impl = choose(q.dtype(), d.hd, op);
  // Only cuDNN reads strided rows itself; the other kernels get packed copies.
  if (!(impl == Impl::Cudnn && cudnn_rows({&q, &k, &v})) && !all_packed({&q, &k, &v}))
    return attention_forward(packed(q), packed(k), packed(v), cu_seqlens, max_seqlen, out, lse,
                             cu_seqlens_host);
  CuSeqlens cu = prepare_cu(cu_seqlens, cu_seqlens_host, d.n, max_seqlen, op);
  if (d.n == 0 || cu.num_seqs == 0) return;
  cudaStream_t s = current_stream();
  switch (impl) {
    case Impl::Cudnn:
#ifdef IEVO_HAVE_CUDNN_FRONTEND
      cudnn_attn::forward(q, k, v, cu.dev, cu.num_seqs, max_seqlen, cu.uniform_len, out, lse);
#endif
      return;
    case Impl::Flash:
      flash::forward(flash_params(q, k, v, cu, max_seqlen, d), out.raw(), lse.data<float>(), s);
      return;
    case Impl::Generic: break;
  }
  const GenParams p = gen_params(cu, d);
  dispatch_kd(d.hd, [&](auto kd) {
    constexpr int KD = decltype(kd)::value;
    const unsigned grid = warp_grid(d.n * d.hq);
    dispatch_fp(q.dtype(), op, [&](auto tag) {
      using T = decltype(tag);
      launch_kernel("gen_fwd", gen_fwd<T, KD>, grid, 32 * kWarpsPerBlock, 0, s, p, q.data<T>(), k.data<T>(),
                    v.data<T>(), out.data<T>(), lse.data<float>());
    });
  });
}

void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens,
                        int max_seqlen, Tensor& dq, Tensor& dk, Tensor& dv,
                        const Tensor& cu_seqlens_host) {
  const char* op = "attention_backward";
  const Dims d = check_qkv(q, k, v, op);
  check_like(dout, q.shape(), q.dtype(), "dout", op);
  check_like(out, q.shape(), q.dtype(), "out", op);
  check_like(lse, {d.hq, d.n}, DType::F32, "lse", op);
  check_like(dq, q.shape(), q.dtype(), "dq", op, true);
  check_like(dk, k.shape(), q.dtype(), "dk", op, true);
  check_like(dv, v.shape(), q.dtype(), "dv", op, true);
  const Impl impl = choose(q.dtype(), d.hd, op);
  // cuDNN reads and writes strided rows itself when each gradient has its input's strides; the
  // other kernels (and other layouts) work on packed copies, the gradients copied back.
  const bool native = impl == Impl::Cudnn && dq.row_stride() == q.row_stride() &&
                      dk.row_stride() == k.row_stride() && dv.row_stride() == v.row_stride() &&
                      cudnn_rows({&q, &k, &v, &dq, &dk, &dv});
  if (!native && !all_packed({&q, &k, &v, &dq, &dk, &dv})) {
    auto out_buf = [](const Tensor& t) {
      return t.is_contiguous() ? t : Tensor::empty(t.shape(), t.dtype(), t.device());
    };
    Tensor dq2 = out_buf(dq), dk2 = out_buf(dk), dv2 = out_buf(dv);
    attention_backward(dout, packed(q), packed(k), packed(v), out, lse, cu_seqlens, max_seqlen, dq2, dk2,
                       dv2, cu_seqlens_host);
    if (!dq.is_contiguous()) dq.copy_from(dq2);
    if (!dk.is_contiguous()) dk.copy_from(dk2);
    if (!dv.is_contiguous()) dv.copy_from(dv2);
    return;
  }
  CuSeqlens cu = prepare_cu(cu_seqlens, cu_seqlens_host, d.n, max_seqlen, op);
  if (d.n == 0 || cu.num_seqs == 0) return;
  cudaStream_t s = current_stream();
  if (impl == Impl::Cudnn) {
#ifdef IEVO_HAVE_CUDNN_FRONTEND
    cudnn_attn::backward(dout, q, k, v, out, lse, cu.dev, cu.num_seqs, max_seqlen, cu.uniform_len,
                         dq, dk, dv);
#endif
    return;
  }
  const GenParams p = gen_params(cu, d);
  DeviceBuffer delta(static_cast<size_t>(d.hq * d.n) * sizeof(float));
  dispatch_kd(d.hd, [&](auto kd) {
    constexpr int KD = decltype(kd)::value;
    const unsigned gq = warp_grid(d.n * d.hq), gk = warp_grid(d.n * d.hkv);
    constexpr int threads = 32 * kWarpsPerBlock;
    auto run = [&](auto tag) {
      using T = decltype(tag);
      launch_kernel("gen_delta", gen_delta<T, KD>, gq, threads, 0, s, p, dout.data<T>(), out.data<T>(),
                    delta.as<float>());
      if (impl == Impl::Flash) return;
      launch_kernel("gen_bwd_dq", gen_bwd_dq<T, KD>, gq, threads, 0, s, p, q.data<T>(), k.data<T>(),
                    v.data<T>(), dout.data<T>(), lse.data<float>(), delta.as<float>(), dq.data<T>());
      launch_kernel("gen_bwd_dkdv", gen_bwd_dkdv<T, KD>, gk, threads, 0, s, p, q.data<T>(), k.data<T>(),
                    v.data<T>(), dout.data<T>(), lse.data<float>(), delta.as<float>(), dk.data<T>(),
                    dv.data<T>());
    };
    dispatch_fp(q.dtype(), op, run);
  });
  if (impl == Impl::Flash) {
    const flash::Params fp = flash_params(q, k, v, cu, max_seqlen, d);
    DeviceBuffer dq_acc = ievo::cuda::deterministic() ? DeviceBuffer()
                                                       : DeviceBuffer(flash::backward_workspace(fp));
    flash::backward(fp, dout.raw(), lse.data<float>(), delta.as<float>(), dq.raw(), dk.raw(),
                    dv.raw(), dq_acc.as<float>(), s);
  }
}

}  // namespace ievo::ops::cuda
