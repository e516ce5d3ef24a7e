// GPU ops against the CPU reference ops on random inputs (label gpu; skipped without a GPU).
// Each CUDA op is called through the public op (which dispatches on the device) and compared
// with the same op on the CPU by relative L2 error:
//   f32:  <= 1e-5 (attention included);
//   bf16: <= 1e-2, the CPU reference run in f32 on the bf16-rounded inputs.
// Observed errors are printed ("[gpu] <case> rel_l2 ...") so they can be reported.
// Also: allocator statistics, copies, error messages, and bit-identical repeats of the
// deterministic backward kernels (embedding, RMSNorm, attention).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "models/batch.h"
#include "parallel/tensor_parallel.h"
#include "runtime/ops/adamw.h"
#include "runtime/ops/attention.h"
#include "runtime/ops/cross_entropy.h"
#include "runtime/ops/elementwise.h"
#include "runtime/ops/embedding.h"
#include "runtime/ops/matmul.h"
#include "runtime/ops/rmsnorm.h"
#include "runtime/ops/rope.h"
#include "runtime/ops/swiglu.h"
#include "runtime/ops/vocab_parallel.h"
#include "util.h"
#ifdef IEVO_CUDA
#include "runtime/cuda/check.h"
#include "runtime/cuda/cuda.h"
#include "runtime/cuda/flash_attn.h"
#endif

namespace ievo {
namespace {

using test::random_tensor;
using test::rel_l2;

constexpr double kTolF32 = 1e-5;
constexpr double kTolBf16 = 1e-2;

#define REQUIRE_GPU() IEVO_REQUIRE_GPU()

double tol(DType dt) { return dt == DType::F32 ? kTolF32 : kTolBf16; }

// Prints and checks one comparison.
void expect_close(const std::string& what, const Tensor& got, const Tensor& ref, double limit) {
  const double e = rel_l2(got, ref);
  std::printf("[gpu] %-44s rel_l2 %.3e (limit %.0e)\n", what.c_str(), e, limit);
  EXPECT_LE(e, limit) << what;
}

// f32 CPU tensor -> dtype dt on the GPU.
Tensor gpu(const Tensor& cpu, DType dt) { return cpu.to(dt).to(Device::CUDA); }
// What the GPU sees, as f32 on the CPU (bf16 rounding applied).
Tensor seen(const Tensor& cpu, DType dt) { return cpu.to(dt).to(DType::F32); }
// GPU tensor -> f32 CPU tensor.
Tensor host(const Tensor& g) { return g.to(Device::CPU).to(DType::F32); }

Tensor rand(const Shape& s, uint64_t seed, double lo = -1, double hi = 1) {
  return random_tensor(s, DType::F32, seed, lo, hi);
}

Tensor rand_ids(int64_t n, int32_t vocab, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_int_distribution<int32_t> u(0, vocab - 1);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = u(rng);
  return Tensor::from_vector(v, {n});
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  Tensor ha = a.to(Device::CPU), hb = b.to(Device::CPU);
  return ha.nbytes() == hb.nbytes() && std::memcmp(ha.raw(), hb.raw(), ha.nbytes()) == 0;
}

const char* dn(DType dt) { return dtype_name(dt); }

// ---------------------------------------------------------------------------------------------
TEST(GpuRuntime, AllocatorStatsAndCopies) {
  REQUIRE_GPU();
  Allocator& a = allocator(Device::CUDA);
  const MemoryStats s0 = a.stats();
  const int64_t bytes = 3 * 1000 * 1000 + 4;  // odd size: rounded internally, counted exactly
  {
    Tensor t = Tensor::empty({bytes / 4}, DType::F32, Device::CUDA);
    const MemoryStats s1 = a.stats();
    EXPECT_EQ(s1.live_bytes - s0.live_bytes, bytes);
    EXPECT_GE(s1.peak_bytes, s1.live_bytes);
    EXPECT_GE(s1.reserved_bytes, s1.live_bytes);
    EXPECT_EQ(s1.num_allocs, s0.num_allocs + 1);
  }
  const MemoryStats s2 = a.stats();
  EXPECT_EQ(s2.live_bytes, s0.live_bytes);
  EXPECT_GE(s2.peak_bytes, s0.live_bytes + bytes);
  {
    Tensor t = Tensor::empty({bytes / 4}, DType::F32, Device::CUDA);  // served from the cache
    EXPECT_EQ(a.stats().reserved_bytes, s2.reserved_bytes);
  }
  a.reset_peak();
  EXPECT_EQ(a.stats().peak_bytes, a.stats().live_bytes);
  a.empty_cache();
  EXPECT_LT(a.stats().reserved_bytes, s2.reserved_bytes);

  // Host -> device -> device -> host round trip, zero_.
  Tensor x = rand({1001}, 1);
  Tensor g = x.to(Device::CUDA);
  Tensor g2 = g.clone();
  EXPECT_TRUE(bit_equal(g2, x));
  g2.zero_();
  EXPECT_EQ(test::max_abs_diff(g2, Tensor::zeros({1001}, DType::F32)), 0.0);
}

TEST(GpuRuntime, StreamsEventsPinned) {
  REQUIRE_GPU();
#ifdef IEVO_CUDA
  cuda::Stream side;
  Tensor x = rand({4096}, 2).to(Device::CUDA);
  cuda::Event done(true), start(true);
  start.record();
  Tensor y = Tensor::empty({4096}, DType::F32, Device::CUDA);
  ops::cast(x, y);
  done.record();
  done.wait(side.get());  // side stream waits for the copy
  {
    cuda::StreamGuard guard(side.get());
    EXPECT_EQ(cuda::current_stream(), side.get());
    ops::scale(y, 2.0);
  }
  EXPECT_EQ(cuda::current_stream(), cuda::compute_stream());
  IEVO_CHECK(cudaStreamSynchronize(side.get()) == cudaSuccess, "sync");
  done.synchronize();
  EXPECT_GE(done.elapsed_ms(start), 0.0f);
  cuda::PinnedBuffer pin(4096 * sizeof(float));
  IEVO_CHECK(cudaMemcpy(pin.data(), y.raw(), 4096 * sizeof(float), cudaMemcpyDeviceToHost) ==
                 cudaSuccess, "copy");
  Tensor hx = x.to(Device::CPU);
  for (int i = 0; i < 4096; i += 97)
    EXPECT_EQ(static_cast<float*>(pin.data())[i], 2.0f * hx.data<float>()[i]);
#endif
}

// ---------------------------------------------------------------------------------------------
class GpuMatmul : public ::testing::TestWithParam<DType> {};

TEST_P(GpuMatmul, AllTransposesAlphaBetaAndSlices) {
  REQUIRE_GPU();
  const DType dt = GetParam();
  const int64_t m = 37, k = 100, n = 53;
  uint64_t seed = 10;
  for (int ta = 0; ta < 2; ++ta) {
    for (int tb = 0; tb < 2; ++tb) {
      Tensor a = rand(ta ? Shape{k, m} : Shape{m, k}, ++seed);
      Tensor b = rand(tb ? Shape{n, k} : Shape{k, n}, ++seed);
      Tensor c = rand({m, n}, ++seed);
      Tensor ref = seen(c, dt);
      ops::matmul(seen(a, dt), ta, seen(b, dt), tb, ref, 0.5f, 0.25f);
      Tensor cg = gpu(c, dt);
      ops::matmul(gpu(a, dt), ta, gpu(b, dt), tb, cg, 0.5f, 0.25f);
      expect_close(std::string("matmul ") + dn(dt) + (ta ? " aT" : " a") + (tb ? " bT" : " b"),
                   host(cg), ref, tol(dt));
    }
  }
  // Column slices of wider matrices (lda = stride(0) > columns), C a column slice too.
  Tensor wa = rand({m, k + 24}, 21), wb = rand({n, k + 8}, 22), wc = rand({m, n + 16}, 23);
  Tensor ref = seen(wc, dt);
  Tensor ref_c = ref.slice(1, 8, 8 + n);
  ops::matmul(seen(wa, dt).slice(1, 16, 16 + k), false, seen(wb, dt).slice(1, 8, 8 + k), true,
              ref_c);
  Tensor gc = gpu(wc, dt);
  Tensor gc_s = gc.slice(1, 8, 8 + n);
  ops::matmul(gpu(wa, dt).slice(1, 16, 16 + k), false, gpu(wb, dt).slice(1, 8, 8 + k), true, gc_s);
  expect_close(std::string("matmul ") + dn(dt) + " column slices", host(gc), ref, tol(dt));
  // matmul_add: D = A B^T + C with C a separate tensor, and in place (C = D).
  Tensor a = rand({m, k}, 24), b = rand({n, k}, 25), c = rand({m, n}, 26);
  Tensor rd = Tensor::empty({m, n}, DType::F32);
  ops::matmul_add(seen(a, dt), false, seen(b, dt), true, seen(c, dt), rd);
  Tensor gcin = gpu(c, dt), gd = Tensor::empty({m, n}, dt, Device::CUDA);
  ops::matmul_add(gpu(a, dt), false, gpu(b, dt), true, gcin, gd);
  expect_close(std::string("matmul_add ") + dn(dt), host(gd), rd, tol(dt));
  expect_close(std::string("matmul_add keeps c ") + dn(dt), host(gcin), seen(c, dt), 0.0);
  ops::matmul_add(gpu(a, dt), false, gpu(b, dt), true, gcin, gcin);
  expect_close(std::string("matmul_add in place ") + dn(dt), host(gcin), rd, tol(dt));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GpuMatmul, ::testing::Values(DType::F32, DType::BF16),
                         [](const auto& i) { return std::string(dtype_name(i.param)); });

// ---------------------------------------------------------------------------------------------
TEST(GpuElementwise, FillAxpyScaleAddCast) {
  REQUIRE_GPU();
  for (DType dt : {DType::F32, DType::BF16}) {
    const Shape s{1001};  // odd length: packed main loop plus a scalar tail
    Tensor x = rand(s, 31), y = rand(s, 32);
    Tensor gx = gpu(x, dt), gy = gpu(y, dt);
    Tensor rx = seen(x, dt), ry = seen(y, dt);
    ops::axpy(0.75, gx, gy);
    ops::axpy(0.75, rx, ry);
    expect_close(std::string("axpy ") + dn(dt), host(gy), ry, tol(dt));
    ops::scale(gy, -1.5);
    ops::scale(ry, -1.5);
    expect_close(std::string("scale ") + dn(dt), host(gy), ry, tol(dt));
    Tensor go = Tensor::empty(s, dt, Device::CUDA), ro = Tensor::empty(s, DType::F32);
    ops::add(gx, gy, go);
    ops::add(rx, ry, ro);
    expect_close(std::string("add ") + dn(dt), host(go), ro, tol(dt));
    ops::fill(go, 0.3);
    EXPECT_LE(test::max_abs_diff(host(go), seen(Tensor::from_vector(std::vector<float>(1001, 0.3f), s), dt)), 0.0);
    // Unaligned views (offset by one element) take the scalar path.
    Tensor gv = gx.slice(0, 1, 1001), rv = rx.slice(0, 1, 1001).clone();
    ops::scale(gv, 2.0);
    ops::scale(rv, 2.0);
    expect_close(std::string("scale unaligned ") + dn(dt), host(gv), rv, tol(dt));
  }
  // Casts agree bit for bit with the CPU casts (round to nearest even).
  Tensor x = rand({999}, 33, -100, 100);
  for (DType to : {DType::BF16, DType::F16}) {
    Tensor gx = x.to(Device::CUDA), g16 = Tensor::empty({999}, to, Device::CUDA);
    ops::cast(gx, g16);
    Tensor c16 = Tensor::empty({999}, to);
    ops::cast(x, c16);
    EXPECT_TRUE(bit_equal(g16, c16)) << "cast f32 -> " << dtype_name(to);
    Tensor back = Tensor::empty({999}, DType::F32, Device::CUDA), cback = Tensor::empty({999}, DType::F32);
    ops::cast(g16, back);
    ops::cast(c16, cback);
    EXPECT_TRUE(bit_equal(back, cback)) << "cast " << dtype_name(to) << " -> f32";
  }
}

TEST(GpuElementwise, SumSquaresAndAllFinite) {
  REQUIRE_GPU();
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor x = rand({1 << 20 | 37}, 41);
    Tensor gx = gpu(x, dt);
    const double got = ops::sum_squares(gx), ref = ops::sum_squares(seen(x, dt));
    std::printf("[gpu] sum_squares %-32s rel %.3e\n", dn(dt), std::fabs(got - ref) / ref);
    EXPECT_NEAR(got, ref, 1e-10 * ref);
    EXPECT_EQ(ops::sum_squares(gx), got) << "repeat must be bit-identical";
    EXPECT_TRUE(ops::all_finite(gx));
  }
  Tensor x = rand({5000}, 42);
  x.data<float>()[4321] = NAN;
  EXPECT_FALSE(ops::all_finite(x.to(Device::CUDA)));
  x.data<float>()[4321] = INFINITY;
  EXPECT_FALSE(ops::all_finite(gpu(x, DType::BF16)));
}

// Programmatic dependent launch (runtime/cuda/kernels.cuh): each kernel may launch before the one
// before it ends, and must not touch memory until that one has. Each round: an elementwise add over
// a table (many waves; its last wave writes the last rows), a gather of the table's rows in reverse
// (its first blocks read the rows the add wrote last), and an add of the gathered rows into a sum
// (it reads what the gather wrote, and the next gather overwrites what it read). Exact only if
// every kernel waited; with the gather's wait taken out, this failed on an H100.
TEST(GpuLaunch, DependentKernelsSeeEachOthersWrites) {
  REQUIRE_GPU();
#ifdef IEVO_CUDA
  std::printf("[gpu] programmatic dependent launch: %s\n", cuda::programmatic_launch() ? "on" : "off");
#endif
  const int64_t v = 4096, d = 1024;
  std::vector<int32_t> reversed(static_cast<size_t>(v));
  for (int64_t i = 0; i < v; ++i) reversed[static_cast<size_t>(i)] = static_cast<int32_t>(v - 1 - i);
  const Tensor ids_host = Tensor::from_vector(reversed, {v});
  const Tensor ids = ids_host.to(Device::CUDA);
  Tensor table = Tensor::zeros({v, d}, DType::F32, Device::CUDA);
  Tensor rows = Tensor::empty({v, d}, DType::F32, Device::CUDA), sum = Tensor::zeros({v, d}, DType::F32, Device::CUDA);
  const Tensor one = Tensor::from_vector(std::vector<float>(static_cast<size_t>(v * d), 1.0f), {v, d}).to(Device::CUDA);
  constexpr int kRounds = 100;
  for (int r = 0; r < kRounds; ++r) {
    ops::add(table, one, table);                           // table = r + 1
    ops::embedding_forward(table, ids, rows, ids_host);    // rows = table's rows, last first
    ops::add(sum, rows, sum);                              // sum = 1 + 2 + ... + (r + 1)
  }
  const Tensor h = sum.to(Device::CPU);
  const float expect = kRounds * (kRounds + 1) / 2.0f;
  int64_t wrong = 0;
  for (int64_t i = 0; i < v * d; ++i) wrong += h.data<float>()[i] != expect;
  EXPECT_EQ(wrong, 0) << "of " << v * d << " elements, expected " << expect;
}

// ---------------------------------------------------------------------------------------------
TEST(GpuEmbedding, ForwardBackwardDeterministic) {
  REQUIRE_GPU();
  const int64_t vocab = 1000, d = 100, n = 777;
  Tensor ids = rand_ids(n, 50, 51);  // ids < 50: many repeats
  ids.data<int32_t>()[5] = static_cast<int32_t>(vocab - 1);
  Tensor gids = ids.to(Device::CUDA);
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor table = rand({vocab, d}, 52);
    Tensor gout = Tensor::empty({n, d}, dt, Device::CUDA), out = Tensor::empty({n, d}, DType::F32);
    ops::embedding_forward(gpu(table, dt), gids, gout);
    ops::embedding_forward(seen(table, dt), ids, out);
    EXPECT_EQ(test::max_abs_diff(host(gout), out), 0.0) << "gather is exact";
    Tensor dout = rand({n, d}, 53);
    Tensor dtab = rand({vocab, d}, 54);
    Tensor ref = seen(dtab, dt);
    ops::embedding_backward(seen(dout, dt), ids, ref);
    Tensor g1 = gpu(dtab, dt), g2 = gpu(dtab, dt);
    ops::embedding_backward(gpu(dout, dt), gids, g1);
    ops::embedding_backward(gpu(dout, dt), gids, g2);
    expect_close(std::string("embedding_backward ") + dn(dt), host(g1), ref, tol(dt));
    EXPECT_TRUE(bit_equal(g1, g2)) << "embedding backward not deterministic";
  }
  // bf16 gradient into an f32 table gradient (mixed precision).
  Tensor dout = rand({n, d}, 55);
  Tensor ref = Tensor::zeros({vocab, d}, DType::F32);
  ops::embedding_backward(seen(dout, DType::BF16), ids, ref);
  Tensor g = Tensor::zeros({vocab, d}, DType::F32, Device::CUDA);
  ops::embedding_backward(gpu(dout, DType::BF16), gids, g);
  expect_close("embedding_backward bf16 -> f32 table", host(g), ref, kTolF32);
  // Out-of-range id: an error naming the id and its position.
  Tensor bad = ids.clone();
  bad.data<int32_t>()[123] = 5000;
  Tensor gout = Tensor::empty({n, d}, DType::F32, Device::CUDA);
  try {
    ops::embedding_forward(rand({vocab, d}, 56).to(Device::CUDA), bad.to(Device::CUDA), gout);
    ADD_FAILURE() << "no error for id 5000";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("5000"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("position 123"), std::string::npos) << e.what();
  }
  // With the ids' host copy (ids_host): the same rows and gradients, and the same error, found
  // on the host with no device round trip (a bad id on the device alone is then not looked at).
  Tensor table = rand({vocab, d}, 57);
  Tensor o1 = Tensor::empty({n, d}, DType::F32, Device::CUDA), o2 = Tensor::empty({n, d}, DType::F32, Device::CUDA);
  ops::embedding_forward(table.to(Device::CUDA), gids, o1);
  ops::embedding_forward(table.to(Device::CUDA), gids, o2, ids);
  EXPECT_TRUE(bit_equal(o1, o2)) << "embedding_forward with ids_host";
  Tensor d1 = Tensor::zeros({vocab, d}, DType::F32, Device::CUDA), d2 = Tensor::zeros({vocab, d}, DType::F32, Device::CUDA);
  ops::embedding_backward(gpu(dout, DType::F32), gids, d1);
  ops::embedding_backward(gpu(dout, DType::F32), gids, d2, ids);
  EXPECT_TRUE(bit_equal(d1, d2)) << "embedding_backward with ids_host";
  for (int pass = 0; pass < 2; ++pass) {
    try {
      if (pass == 0) ops::embedding_forward(table.to(Device::CUDA), gids, o1, bad);
      else ops::embedding_backward(gpu(dout, DType::F32), gids, d1, bad);
      ADD_FAILURE() << "no error for id 5000 in ids_host, pass " << pass;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("5000"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("position 123"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(pass == 0 ? "embedding_forward" : "embedding_backward"),
                std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(ops::embedding_forward(table.to(Device::CUDA), gids, o1, ids.slice(0, 0, n - 1)), Error)
      << "ids_host of another length";
}

// A copy from pageable host memory to the device does not wait for the stream (it returns once
// the source is staged): the source may be overwritten at once, behind a kernel still running.
TEST(GpuCopy, PageableToDeviceSourceReusableAtOnce) {
  REQUIRE_GPU();
  const int64_t n = 1 << 16;
  Tensor big = rand({4096, 4096}, 58).to(Device::CUDA), c = Tensor::empty({4096, 4096}, DType::F32, Device::CUDA);
  Tensor src = Tensor::empty({n}, DType::F32);
  std::vector<Tensor> dev;
  for (int r = 0; r < 4; ++r) {
    ops::matmul(big, false, big, false, c);  // ~1 ms of device work queued ahead of the copy
    for (int64_t i = 0; i < n; ++i) src.data<float>()[i] = static_cast<float>(r * n + i);
    dev.push_back(src.to(Device::CUDA));
  }
  for (int r = 0; r < 4; ++r) {
    Tensor h = dev[static_cast<size_t>(r)].to(Device::CPU);
    int64_t wrong = 0;
    for (int64_t i = 0; i < n; ++i) wrong += h.data<float>()[i] != static_cast<float>(r * n + i);
    EXPECT_EQ(wrong, 0) << "copy " << r;
  }
}

// A batch copied to the device keeps its ids and targets on the host too (the embedding checks
// the ids there, num_targets counts there), sliced along with the device tensors (Ulysses).
TEST(GpuBatch, HostCopiesOfIdsAndTargets) {
  REQUIRE_GPU();
  std::vector<int32_t> rows;
  for (int i = 0; i < 2 * 5; ++i) rows.push_back(i + 1);
  Batch b = make_batch(rows, 2, 4);
  b.targets.data<int32_t>()[6] = -100;
  const Batch g = b.to(Device::CUDA);
  EXPECT_EQ(g.inputs_host.raw(), b.inputs.raw()) << "the host tensor itself, no copy";
  EXPECT_EQ(g.targets_host.raw(), b.targets.raw());
  EXPECT_EQ(g.num_targets(), 7);
  const Batch s = sequence_slice(g, 2, 1);
  ASSERT_EQ(s.inputs_host.numel(), 4);
  EXPECT_EQ(test::max_abs_diff(s.inputs.to(Device::CPU), s.inputs_host), 0.0);
  EXPECT_EQ(test::max_abs_diff(s.targets.to(Device::CPU), s.targets_host), 0.0);
  EXPECT_EQ(s.num_targets(), 3);
  EXPECT_FALSE(g.to(Device::CPU).inputs_host.defined());
}

// ---------------------------------------------------------------------------------------------
TEST(GpuRmsNorm, ForwardBackwardDeterministic) {
  REQUIRE_GPU();
  // 100: bf16 element path, f32 packs (the forward a warp per row, 25 of 32 lanes busy); 512 (f32,
  // bf16) and 768 (bf16): the forward a warp per row (4, 2 and 3 packs a lane; 9001 rows leave the
  // last block of 8 rows one), the backward one pack per thread in narrow blocks;
  // 2048/3000: packed paths (1-4 packs per thread); 12000: element path with the dw partial in
  // global scratch. 768 and 2048 with 2600 rows: more rows than the backward's blocks, so a block
  // handles several, and dw's partial rows summed in 16 / 8 slices of 128; 1536 with 1000 rows
  // (1000 blocks for bf16): 8 slices, the last one of 104 rows; the others one slice.
  for (int64_t d : {int64_t{100}, int64_t{512}, int64_t{768}, int64_t{1536}, int64_t{2048}, int64_t{3000},
                    int64_t{12000}}) {
    const int64_t n = d > 4096 ? 9 : d == 512 ? 9001 : (d == 768 || d == 2048) ? 2600 : d == 1536 ? 1000 : 37;
    for (DType dt : {DType::F32, DType::BF16}) {
      Tensor x = rand({n, d}, 61), w = rand({d}, 62, 0.5, 1.5), dy = rand({n, d}, 63);
      Tensor rx = seen(x, dt), rw = seen(w, dt), rdy = seen(dy, dt);
      Tensor y = Tensor::empty({n, d}, DType::F32), rstd = Tensor::empty({n}, DType::F32);
      ops::rmsnorm_forward(rx, rw, 1e-5, y, rstd);
      Tensor gx = gpu(x, dt), gw = gpu(w, dt);
      Tensor gy = Tensor::empty({n, d}, dt, Device::CUDA), grstd = Tensor::empty({n}, DType::F32, Device::CUDA);
      ops::rmsnorm_forward(gx, gw, 1e-5, gy, grstd);
      const std::string tag = std::string(dn(dt)) + " D=" + std::to_string(d);
      expect_close("rmsnorm_forward y " + tag, host(gy), y, tol(dt));
      expect_close("rmsnorm_forward rstd " + tag, host(grstd), rstd, kTolF32);
      Tensor dx = Tensor::empty({n, d}, DType::F32), dw = rand({d}, 64);
      Tensor gdw_init = dw.clone();
      ops::rmsnorm_backward(rdy, rx, rw, rstd, dx, dw);
      Tensor gdx = Tensor::empty({n, d}, dt, Device::CUDA);
      Tensor gdw = gdw_init.to(Device::CUDA);  // f32 accumulation buffer
      ops::rmsnorm_backward(gpu(dy, dt), gx, gw, grstd, gdx, gdw);
      expect_close("rmsnorm_backward dx " + tag, host(gdx), dx, tol(dt));
      expect_close("rmsnorm_backward dw " + tag, host(gdw), dw, tol(dt));
      Tensor gdx2 = Tensor::empty({n, d}, dt, Device::CUDA), gdw2 = gdw_init.to(Device::CUDA);
      ops::rmsnorm_backward(gpu(dy, dt), gx, gw, grstd, gdx2, gdw2);
      EXPECT_TRUE(bit_equal(gdx, gdx2) && bit_equal(gdw, gdw2)) << "rmsnorm backward not deterministic";
      // With the residual path's gradient added in the same pass.
      Tensor res = rand({n, d}, 65), rdx = Tensor::empty({n, d}, DType::F32), rdw = gdw_init.clone();
      ops::rmsnorm_backward(rdy, rx, rw, rstd, rdx, rdw, seen(res, dt));
      Tensor gdx3 = Tensor::empty({n, d}, dt, Device::CUDA), gdw3 = gdw_init.to(Device::CUDA);
      ops::rmsnorm_backward(gpu(dy, dt), gx, gw, grstd, gdx3, gdw3, gpu(res, dt));
      expect_close("rmsnorm_backward dx + residual " + tag, host(gdx3), rdx, tol(dt));
      expect_close("rmsnorm_backward dw (residual call) " + tag, host(gdw3), dw, tol(dt));
      // In place, as the model calls it: dx written over x.
      Tensor gx4 = gpu(x, dt), gdw4 = gdw_init.to(Device::CUDA);
      ops::rmsnorm_backward(gpu(dy, dt), gx4, gw, grstd, gx4, gdw4, gpu(res, dt));
      expect_close("rmsnorm_backward dx over x " + tag, host(gx4), rdx, tol(dt));
      // dw_beta 0 (a lazily zeroed gradient's first write): a NaN-filled dw is overwritten with
      // the same sum that accumulating into zeros gives, bit for bit.
      Tensor gdw5 = Tensor::from_vector(std::vector<float>(d, NAN), {d}).to(Device::CUDA);
      Tensor gdw6 = Tensor::zeros({d}, DType::F32, Device::CUDA);
      Tensor gdx5 = Tensor::empty({n, d}, dt, Device::CUDA);
      ops::rmsnorm_backward(gpu(dy, dt), gx, gw, grstd, gdx5, gdw5, gpu(res, dt), 0.0f);
      ops::rmsnorm_backward(gpu(dy, dt), gx, gw, grstd, gdx5, gdw6, gpu(res, dt));
      EXPECT_TRUE(bit_equal(gdw5, gdw6)) << "rmsnorm_backward dw_beta 0 " << tag;
    }
  }
}

// ---------------------------------------------------------------------------------------------
TEST(GpuRope, ForwardBackwardInPlace) {
  REQUIRE_GPU();
  const int64_t n = 37;
  std::vector<int32_t> pv(n);
  for (int64_t i = 0; i < n; ++i) pv[i] = static_cast<int32_t>((i * 97) % 2048);
  Tensor pos = Tensor::from_vector(pv, {n});
  Tensor gpos = pos.to(Device::CUDA);
  // bf16, hd 64 and 128: whole rows (rope_rows_kernel; 37 tokens, so the last block has fewer
  // than its tokens); hd 24: 4 pairs a thread (rope_kernel_vec), 5 heads (4 loaded at a time + 1);
  // hd 12 (6 pairs): one pair a thread.
  for (auto [hd, h] : {std::pair<int64_t, int64_t>{64, 3}, {128, 6}, {24, 5}, {12, 3}})
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor x = rand({n, h, hd}, 71);
    Tensor y = Tensor::empty({n, h, hd}, DType::F32);
    ops::rope_forward(seen(x, dt), pos, 10000.0, y);
    Tensor gy = gpu(x, dt);
    ops::rope_forward(gy, gpos, 10000.0, gy);  // in place
    expect_close(std::string("rope_forward ") + dn(dt) + " hd " + std::to_string(hd), host(gy), y, tol(dt));
    Tensor dx = Tensor::empty({n, h, hd}, DType::F32);
    ops::rope_backward(seen(x, dt), pos, 10000.0, dx);
    Tensor gdx = Tensor::empty({n, h, hd}, dt, Device::CUDA);
    ops::rope_backward(gpu(x, dt), gpos, 10000.0, gdx);
    expect_close(std::string("rope_backward ") + dn(dt) + " hd " + std::to_string(hd), host(gdx), dx, tol(dt));
    // Strided rows, as the model's q: the middle columns of a wider matrix, in place; and from a
    // packed input into such columns.
    Tensor wide = Tensor::zeros({n, (h + 2) * hd}, dt, Device::CUDA);
    Tensor sx = wide.slice(1, hd, (h + 1) * hd).view({n, h, hd});
    sx.copy_from(gpu(x, dt));
    ops::rope_forward(sx, gpos, 10000.0, sx);
    expect_close(std::string("rope_forward strided ") + dn(dt) + " hd " + std::to_string(hd), host(sx), y, tol(dt));
    EXPECT_EQ(test::max_abs_diff(host(wide.slice(1, 0, hd)), Tensor::zeros({n, hd}, DType::F32)), 0.0)
        << "rope_forward strided wrote outside its columns";
    ops::rope_backward(gpu(x, dt), gpos, 10000.0, sx);
    expect_close(std::string("rope_backward strided ") + dn(dt) + " hd " + std::to_string(hd), host(sx), dx, tol(dt));
  }
}

// ---------------------------------------------------------------------------------------------
TEST(GpuSwiglu, ForwardBackward) {
  REQUIRE_GPU();
  const Shape s{37, 101};
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor g = rand(s, 81, -4, 4), u = rand(s, 82), dout = rand(s, 83);
    Tensor out = Tensor::empty(s, DType::F32);
    ops::swiglu_forward(seen(g, dt), seen(u, dt), out);
    Tensor gout = Tensor::empty(s, dt, Device::CUDA);
    ops::swiglu_forward(gpu(g, dt), gpu(u, dt), gout);
    expect_close(std::string("swiglu_forward ") + dn(dt), host(gout), out, tol(dt));
    Tensor dg = Tensor::empty(s, DType::F32), du = Tensor::empty(s, DType::F32);
    ops::swiglu_backward(seen(dout, dt), seen(g, dt), seen(u, dt), dg, du);
    Tensor gg = gpu(g, dt), gu = gpu(u, dt);
    ops::swiglu_backward(gpu(dout, dt), gg, gu, gg, gu);  // in place
    expect_close(std::string("swiglu_backward dgate ") + dn(dt), host(gg), dg, tol(dt));
    expect_close(std::string("swiglu_backward dup ") + dn(dt), host(gu), du, tol(dt));
  }
  // Gate and up as the two halves of one [rows, 2F] matrix (a joint gate/up GEMM's output), the
  // gradients written over them: F = 128 (16-byte packs) and 101 (one element at a time).
  for (int64_t f : {128, 101})
  for (DType dt : {DType::F32, DType::BF16}) {
    const Shape sf{37, f};
    Tensor g = rand(sf, 84, -4, 4), u = rand(sf, 85), dout = rand(sf, 86);
    Tensor out = Tensor::empty(sf, DType::F32), dg = Tensor::empty(sf, DType::F32), du = Tensor::empty(sf, DType::F32);
    ops::swiglu_forward(seen(g, dt), seen(u, dt), out);
    ops::swiglu_backward(seen(dout, dt), seen(g, dt), seen(u, dt), dg, du);
    Tensor gu = Tensor::empty({37, 2 * f}, dt, Device::CUDA);
    Tensor sg = gu.slice(1, 0, f), su = gu.slice(1, f, 2 * f);
    sg.copy_from(gpu(g, dt));
    su.copy_from(gpu(u, dt));
    Tensor gout = Tensor::empty(sf, dt, Device::CUDA);
    ops::swiglu_forward(sg, su, gout);
    const std::string tag = std::string(dn(dt)) + " F " + std::to_string(f);
    expect_close("swiglu_forward strided " + tag, host(gout), out, tol(dt));
    ops::swiglu_backward(gpu(dout, dt), sg, su, sg, su);
    expect_close("swiglu_backward strided dgate " + tag, host(sg), dg, tol(dt));
    expect_close("swiglu_backward strided dup " + tag, host(su), du, tol(dt));
  }
}

// ---------------------------------------------------------------------------------------------
void check_cross_entropy(int64_t n, int64_t v) {
  Tensor targets = rand_ids(n, static_cast<int32_t>(v), 91);
  targets.data<int32_t>()[3] = ops::kIgnoreIndex;
  targets.data<int32_t>()[20] = ops::kIgnoreIndex;
  Tensor gt = targets.to(Device::CUDA);
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor logits = rand({n, v}, 92, -6, 6);
    Tensor rl = seen(logits, dt);
    Tensor losses = Tensor::empty({n}, DType::F32);
    int64_t count = 0, gcount = 0;
    const double sum = ops::cross_entropy_forward(rl, targets, losses, &count);
    Tensor gl = gpu(logits, dt);
    Tensor glosses = Tensor::empty({n}, DType::F32, Device::CUDA);
    const double gsum = ops::cross_entropy_forward(gl, gt, glosses, &gcount);
    EXPECT_EQ(gcount, count);
    std::printf("[gpu] cross_entropy sum %s V=%-24lld rel %.3e\n", dn(dt), static_cast<long long>(v), std::fabs(gsum - sum) / sum);
    EXPECT_NEAR(gsum, sum, 1e-5 * sum);
    expect_close(std::string("cross_entropy_forward losses ") + dn(dt) + " V=" + std::to_string(v), host(glosses), losses, kTolF32);
    Tensor dl = Tensor::empty({n, v}, DType::F32);
    ops::cross_entropy_backward(rl, targets, 0.5, dl);
    Tensor gl2 = gl.clone(), glosses2 = Tensor::empty({n}, DType::F32, Device::CUDA);
    ops::cross_entropy_backward(gl, gt, 0.5, gl);  // in place
    expect_close(std::string("cross_entropy_backward ") + dn(dt) + " V=" + std::to_string(v), host(gl), dl, tol(dt));
    // Forward and backward in one pass, in place: the same sum, count, losses and gradient.
    int64_t fcount = 0;
    const double fsum = ops::cross_entropy_forward_backward(gl2, gt, 0.5, glosses2, &fcount, gl2);
    EXPECT_EQ(fcount, count);
    EXPECT_NEAR(fsum, sum, 1e-5 * sum);
    expect_close(std::string("cross_entropy_forward_backward losses ") + dn(dt), host(glosses2), losses, kTolF32);
    expect_close(std::string("cross_entropy_forward_backward grad ") + dn(dt), host(gl2), dl, tol(dt));
  }
}

TEST(GpuCrossEntropy, ForwardBackwardIgnoreIndex) {
  REQUIRE_GPU();
  // packed rows (1000, and a vocabulary of real size), element rows
  // and larger vocabularies (InternLM2's 92544, a row of 240 KB in bf16).
  for (int64_t v : {int64_t{1000}, int64_t{1001}, int64_t{32000}, int64_t{92544}, int64_t{120000}})
    check_cross_entropy(37, v);
}

TEST(GpuCrossEntropy, BadTarget) {
  REQUIRE_GPU();
  const int64_t n = 37, v = 1000;
  Tensor targets = rand_ids(n, static_cast<int32_t>(v), 91);
  Tensor bad = targets.clone();
  bad.data<int32_t>()[7] = 1000;
  Tensor gl = rand({n, v}, 93).to(Device::CUDA), gls = Tensor::empty({n}, DType::F32, Device::CUDA);
  EXPECT_THROW(ops::cross_entropy_forward(gl, bad.to(Device::CUDA), gls, nullptr), Error);
  EXPECT_THROW(ops::cross_entropy_forward_backward(gl, bad.to(Device::CUDA), 1.0, gls, nullptr, gl), Error);
}


TEST(GpuCrossEntropy, LmHeadLossChunked) {
  REQUIRE_GPU();
  const int64_t n = 45, d = 64, v = 1000;
  Tensor h = rand({n, d}, 94), w = rand({v, d}, 95, -0.2, 0.2);
  Tensor targets = rand_ids(n, static_cast<int32_t>(v), 96);
  targets.data<int32_t>()[0] = ops::kIgnoreIndex;
  Tensor dh = Tensor::empty({n, d}, DType::F32), dw = Tensor::zeros({v, d}, DType::F32);
  int64_t count = 0, gcount = 0;
  const double loss = ops::lm_head_loss(h, w, targets, 1.0 / 44, 16, &count, &dh, &dw);
  Tensor gdh = Tensor::empty({n, d}, DType::F32, Device::CUDA), gdw = Tensor::zeros({v, d}, DType::F32, Device::CUDA);
  const double gloss = ops::lm_head_loss(h.to(Device::CUDA), w.to(Device::CUDA), targets.to(Device::CUDA),
                                         1.0 / 44, 16, &gcount, &gdh, &gdw);
  EXPECT_EQ(gcount, count);
  EXPECT_NEAR(gloss, loss, 1e-5 * loss);
  expect_close("lm_head_loss dh f32", host(gdh), dh, kTolF32);
  expect_close("lm_head_loss dw f32", host(gdw), dw, kTolF32);
  // The forward alone (evaluation); the count adds to the caller's. The chunks' totals stay on the
  // device until the end of the head (one read-back), so check the sum over all 3 chunks.
  int64_t fcount = 5;
  const double floss = ops::lm_head_loss(h.to(Device::CUDA), w.to(Device::CUDA), targets.to(Device::CUDA),
                                         1.0, 16, &fcount, nullptr, nullptr);
  EXPECT_EQ(fcount, 5 + count);
  EXPECT_NEAR(floss, loss, 1e-5 * loss);
  // A target outside the vocabulary in the third chunk: an error naming it and its row of the head,
  // with and without gradients.
  Tensor bad = targets.clone();
  bad.data<int32_t>()[37] = 1000;
  for (bool grads : {true, false}) {
    try {
      ops::lm_head_loss(h.to(Device::CUDA), w.to(Device::CUDA), bad.to(Device::CUDA), 1.0, 16, nullptr,
                        grads ? &gdh : nullptr, grads ? &gdw : nullptr);
      ADD_FAILURE() << "no error for target 1000";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("target 1000 at row 37"), std::string::npos) << e.what();
    }
  }
}

// ---------------------------------------------------------------------------------------------
TEST(GpuAdamW, MatchesCpu) {
  REQUIRE_GPU();
  const Shape s{1003};
  ops::AdamWHyper hp;
  hp.lr = 3e-3;
  hp.weight_decay = 0.1;
  hp.step = 7;
  hp.grad_scale = 0.5;
  for (DType gdt : {DType::F32, DType::BF16}) {
    Tensor p = rand(s, 101), g = rand(s, 102), m = rand(s, 103, -0.1, 0.1), v = rand(s, 104, 0, 0.01);
    Tensor rp = p.clone(), rm = m.clone(), rv = v.clone();
    Tensor rlow = Tensor::empty(s, DType::BF16);
    ops::adamw_step(rp, seen(g, gdt), rm, rv, hp, &rlow);
    Tensor gp = p.to(Device::CUDA), gm = m.to(Device::CUDA), gv = v.to(Device::CUDA);
    Tensor glow = Tensor::empty(s, DType::BF16, Device::CUDA);
    ops::adamw_step(gp, gpu(g, gdt), gm, gv, hp, &glow);
    expect_close(std::string("adamw param (grad ") + dn(gdt) + ")", host(gp), rp, kTolF32);
    expect_close(std::string("adamw m (grad ") + dn(gdt) + ")", host(gm), rm, kTolF32);
    expect_close(std::string("adamw v (grad ") + dn(gdt) + ")", host(gv), rv, kTolF32);
    expect_close(std::string("adamw bf16 copy (grad ") + dn(gdt) + ")", host(glow), rlow.to(DType::F32), 5e-3);
  }
}

// Master weights as (bf16 weight, i16 remainder): the GPU's split/join are the CPU's bit for bit
// (edge patterns and random ones), and its AdamW on them is its AdamW on the f32 master bit for
// bit (the same kernel arithmetic), and the CPU's within f32 rounding.
TEST(GpuAdamW, RemaindersEqualTheF32MasterAndTheCpu) {
  REQUIRE_GPU();
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x3f808000u, 0x3f818000u, 0xbf808000u,
                                0x7f7fffffu, 0x7f800000u, 0x0000ffffu, 0x00008000u, 0x3f7fffffu};
  uint64_t x = 0x2545f4914f6cdd1dull;
  while (bits.size() < 100003) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    bits.push_back(static_cast<uint32_t>(x >> 32));
  }
  const int64_t nb = static_cast<int64_t>(bits.size());
  Tensor master = Tensor::empty({nb}, DType::F32);
  std::memcpy(master.raw(), bits.data(), bits.size() * 4);
  Tensor cw = Tensor::empty({nb}, DType::BF16), cr = Tensor::empty({nb}, DType::I16);
  ops::split_master(master, cw, cr);
  Tensor gw = Tensor::empty({nb}, DType::BF16, Device::CUDA), gr = Tensor::empty({nb}, DType::I16, Device::CUDA);
  ops::split_master(master.to(Device::CUDA), gw, gr);
  EXPECT_EQ(std::memcmp(gw.to(Device::CPU).raw(), cw.raw(), nb * 2), 0) << "split: weights";
  EXPECT_EQ(std::memcmp(gr.to(Device::CPU).raw(), cr.raw(), nb * 2), 0) << "split: remainders";
  Tensor back = Tensor::empty({nb}, DType::F32, Device::CUDA);
  ops::join_master(gw, gr, back);
  EXPECT_EQ(std::memcmp(back.to(Device::CPU).raw(), master.raw(), nb * 4), 0) << "join";

  const Shape s{1003};  // odd: the 4-wide loop and the tail
  ops::AdamWHyper hp;
  hp.lr = 3e-3;
  hp.weight_decay = 0.1;
  hp.grad_scale = 0.5;
  for (DType gdt : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dn(gdt));
    const Tensor p = rand(s, 111), m = rand(s, 112, -0.1, 0.1), v = rand(s, 113, 0, 0.01);
    Tensor fp = p.to(Device::CUDA), fm = m.to(Device::CUDA), fv = v.to(Device::CUDA);  // f32 master
    Tensor rw = Tensor::empty(s, DType::BF16, Device::CUDA), rr = Tensor::empty(s, DType::I16, Device::CUDA);
    ops::split_master(fp, rw, rr);
    Tensor rm = fm.clone(), rv = fv.clone();
    Tensor hw = Tensor::empty(s, DType::BF16), hr = Tensor::empty(s, DType::I16);  // the CPU's
    ops::split_master(p, hw, hr);
    Tensor hm = m.clone(), hv = v.clone();
    for (int64_t step = 1; step <= 3; ++step) {
      hp.step = step;
      const Tensor g = rand(s, 120 + static_cast<uint64_t>(step), -2, 2);
      ops::adamw_step(fp, gpu(g, gdt), fm, fv, hp);
      ops::adamw_step_remainder(rw, rr, gpu(g, gdt), rm, rv, hp);
      ops::adamw_step_remainder(hw, hr, g.to(gdt), hm, hv, hp);
    }
    Tensor joined = Tensor::empty(s, DType::F32, Device::CUDA);
    ops::join_master(rw, rr, joined);
    EXPECT_EQ(std::memcmp(joined.to(Device::CPU).raw(), fp.to(Device::CPU).raw(), 1003 * 4), 0) << "master";
    EXPECT_EQ(std::memcmp(rm.to(Device::CPU).raw(), fm.to(Device::CPU).raw(), 1003 * 4), 0) << "m";
    EXPECT_EQ(std::memcmp(rv.to(Device::CPU).raw(), fv.to(Device::CPU).raw(), 1003 * 4), 0) << "v";
    Tensor hj = Tensor::empty(s, DType::F32);
    ops::join_master(hw, hr, hj);
    expect_close(std::string("remainder adamw vs cpu (grad ") + dn(gdt) + ")", host(joined), hj, kTolF32);
    expect_close(std::string("remainder adamw m vs cpu (grad ") + dn(gdt) + ")", host(rm), hm, kTolF32);
  }
}

// ---------------------------------------------------------------------------------------------
// Attention: 3 packed sequences of different lengths (one shorter than a tile, one spanning
// several tiles with a ragged end, one exactly a tile), GQA 4:1 and 1:1, hd 64/128 (and 32 for
// the generic kernel), f32 (generic kernel) and bf16 (flash mma kernels / cuDNN).
struct AttnCase {
  DType dt;
  int hd, hq, hkv;
  ops::AttentionBackend backend;
};

std::string attn_name(const AttnCase& c) {
  return detail::cat(dtype_name(c.dt), "_hd", c.hd, "_", c.hq, "x", c.hkv, "_",
                     c.backend == ops::AttentionBackend::Cudnn ? "cudnn" : "flash");
}

class GpuAttention : public ::testing::TestWithParam<AttnCase> {
 protected:
  void TearDown() override { ops::set_attention_backend(ops::AttentionBackend::Auto); }
};

// One layout of packed sequences: GPU forward/backward (device cu_seqlens with its host mirror for
// the forward, host cu_seqlens for the backward: cuDNN's dense graphs when all sequences have the
// same length, else the ragged ones) against the CPU, then a bit-identical repeat of the
// backward (device cu_seqlens, with the mirror for the uniform layouts, without for the others).
void check_attention(const AttnCase& c, const std::vector<int32_t>& cu_v, const std::string& label) {
  const int64_t n = cu_v.back();
  int max_seqlen = 0;
  for (size_t i = 1; i < cu_v.size(); ++i) max_seqlen = std::max(max_seqlen, cu_v[i] - cu_v[i - 1]);
  const int64_t nseq = static_cast<int64_t>(cu_v.size());
  Tensor cu = Tensor::from_vector(cu_v, {nseq});
  Tensor q = rand({n, c.hq, c.hd}, 111), k = rand({n, c.hkv, c.hd}, 112), v = rand({n, c.hkv, c.hd}, 113);
  Tensor dout = rand({n, c.hq, c.hd}, 114);
  // CPU reference on what the GPU sees.
  Tensor rq = seen(q, c.dt), rk = seen(k, c.dt), rv = seen(v, c.dt), rdo = seen(dout, c.dt);
  Tensor out = Tensor::empty({n, c.hq, c.hd}, DType::F32), lse = Tensor::empty({c.hq, n}, DType::F32);
  ops::attention_forward(rq, rk, rv, cu, max_seqlen, out, lse);
  Tensor dq = Tensor::empty(q.shape(), DType::F32), dk = Tensor::empty(k.shape(), DType::F32),
         dv = Tensor::empty(v.shape(), DType::F32);
  ops::attention_backward(rdo, rq, rk, rv, out, lse, cu, max_seqlen, dq, dk, dv);

  Tensor gq = gpu(q, c.dt), gk = gpu(k, c.dt), gv = gpu(v, c.dt), gdo = gpu(dout, c.dt);
  Tensor gcu = cu.to(Device::CUDA);
  Tensor gout = Tensor::empty(q.shape(), c.dt, Device::CUDA);
  Tensor glse = Tensor::empty({c.hq, n}, DType::F32, Device::CUDA);
  ops::attention_forward(gq, gk, gv, gcu, max_seqlen, gout, glse, cu);
  const std::string name = attn_name(c) + " " + label;
  const double t = tol(c.dt);
  expect_close("attention out " + name, host(gout), out, t);
  expect_close("attention lse " + name, host(glse), lse, c.dt == DType::F32 ? kTolF32 : 1e-3);
#ifdef IEVO_CUDA
  // On Hopper the flash forward is the wgmma kernel: its mma.sync sibling against the CPU too.
  if (c.backend == ops::AttentionBackend::Flash && c.dt != DType::F32 && cuda::flash::use_wgmma()) {
    cuda::flash::set_use_wgmma(false);
    Tensor o2 = Tensor::empty(q.shape(), c.dt, Device::CUDA), l2 = Tensor::empty({c.hq, n}, DType::F32, Device::CUDA);
    ops::attention_forward(gq, gk, gv, gcu, max_seqlen, o2, l2, cu);
    cuda::flash::set_use_wgmma(true);
    expect_close("attention out (mma.sync kernel) " + name, host(o2), out, t);
    expect_close("attention lse (mma.sync kernel) " + name, host(l2), lse, 1e-3);
  }
#endif
  Tensor gdq = Tensor::empty(q.shape(), c.dt, Device::CUDA), gdk = Tensor::empty(k.shape(), c.dt, Device::CUDA),
         gdv = Tensor::empty(v.shape(), c.dt, Device::CUDA);
  ops::attention_backward(gdo, gq, gk, gv, gout, glse, cu /* host cu_seqlens */, max_seqlen, gdq, gdk, gdv);
  expect_close("attention dq " + name, host(gdq), dq, t);
  expect_close("attention dk " + name, host(gdk), dk, t);
  expect_close("attention dv " + name, host(gdv), dv, t);
#ifdef IEVO_CUDA
  // On Hopper the fused flash backward is the wgmma kernel: its mma.sync sibling too.
  if (c.backend == ops::AttentionBackend::Flash && c.dt != DType::F32 && cuda::flash::use_wgmma()) {
    cuda::flash::set_use_wgmma(false);
    Tensor q2 = Tensor::empty(q.shape(), c.dt, Device::CUDA), k2 = Tensor::empty(k.shape(), c.dt, Device::CUDA),
           v2 = Tensor::empty(v.shape(), c.dt, Device::CUDA);
    ops::attention_backward(gdo, gq, gk, gv, gout, glse, cu, max_seqlen, q2, k2, v2);
    cuda::flash::set_use_wgmma(true);
    expect_close("attention dq (mma.sync kernel) " + name, host(q2), dq, t);
    expect_close("attention dk (mma.sync kernel) " + name, host(k2), dk, t);
    expect_close("attention dv (mma.sync kernel) " + name, host(v2), dv, t);
  }
#endif

  // Determinism of the backward (cuDNN in its deterministic mode).
#ifdef IEVO_CUDA
  cuda::set_deterministic(true);
#endif
  Tensor a1 = Tensor::empty(q.shape(), c.dt, Device::CUDA), b1 = Tensor::empty(k.shape(), c.dt, Device::CUDA),
         c1 = Tensor::empty(v.shape(), c.dt, Device::CUDA);
  Tensor a2 = Tensor::empty(q.shape(), c.dt, Device::CUDA), b2 = Tensor::empty(k.shape(), c.dt, Device::CUDA),
         c2 = Tensor::empty(v.shape(), c.dt, Device::CUDA);
  bool uniform = true;
  for (size_t i = 2; i < cu_v.size(); ++i) uniform = uniform && cu_v[i] - cu_v[i - 1] == cu_v[1];
  const Tensor mirror = uniform ? cu : Tensor();
  ops::attention_backward(gdo, gq, gk, gv, gout, glse, gcu, max_seqlen, a1, b1, c1, mirror);
  ops::attention_backward(gdo, gq, gk, gv, gout, glse, gcu, max_seqlen, a2, b2, c2, mirror);
#ifdef IEVO_CUDA
  cuda::set_deterministic(false);
#endif
  EXPECT_TRUE(bit_equal(a1, a2) && bit_equal(b1, b2) && bit_equal(c1, c2))
      << "attention backward not bit-identical across runs (" << name << ")";
  // The deterministic kernels (flash: separate dq and dk/dv kernels, no atomics) against the CPU.
  expect_close("attention dq (deterministic) " + name, host(a1), dq, t);
  expect_close("attention dk (deterministic) " + name, host(b1), dk, t);
  expect_close("attention dv (deterministic) " + name, host(c1), dv, t);

  // Strided rows, as the model passes them: q, k, v column slices of one [n, (hq + 2 hkv) hd]
  // matrix, dq, dk, dv written into slices of another (cuDNN reads and writes them in place, the
  // other kernels go through packed copies); then gradients into packed buffers from strided
  // inputs (cuDNN's strides differ, so it too goes through copies).
  const int64_t qd = c.hq * c.hd, kd = c.hkv * c.hd, w = qd + 2 * kd;
  Tensor joint = Tensor::empty({n, w}, c.dt, Device::CUDA), djoint = Tensor::zeros({n, w}, c.dt, Device::CUDA);
  auto part = [&](const Tensor& m, int64_t c0, int64_t heads) {
    return m.slice(1, c0, c0 + heads * c.hd).view({n, heads, c.hd});
  };
  Tensor sq = part(joint, 0, c.hq), sk = part(joint, qd, c.hkv), sv = part(joint, qd + kd, c.hkv);
  sq.copy_from(gq);
  sk.copy_from(gk);
  sv.copy_from(gv);
  Tensor so = Tensor::empty(q.shape(), c.dt, Device::CUDA), sl = Tensor::empty({c.hq, n}, DType::F32, Device::CUDA);
  ops::attention_forward(sq, sk, sv, gcu, max_seqlen, so, sl, cu);
  expect_close("attention out (strided) " + name, host(so), out, t);
  Tensor sdq = part(djoint, 0, c.hq), sdk = part(djoint, qd, c.hkv), sdv = part(djoint, qd + kd, c.hkv);
  ops::attention_backward(gdo, sq, sk, sv, so, sl, cu, max_seqlen, sdq, sdk, sdv);
  expect_close("attention dq (strided) " + name, host(sdq), dq, t);
  expect_close("attention dk (strided) " + name, host(sdk), dk, t);
  expect_close("attention dv (strided) " + name, host(sdv), dv, t);
  Tensor pdq = Tensor::empty(q.shape(), c.dt, Device::CUDA), pdk = Tensor::empty(k.shape(), c.dt, Device::CUDA),
         pdv = Tensor::empty(v.shape(), c.dt, Device::CUDA);
  ops::attention_backward(gdo, sq, sk, sv, so, sl, cu, max_seqlen, pdq, pdk, pdv);
  expect_close("attention dq (strided in, packed out) " + name, host(pdq), dq, t);
  expect_close("attention dv (strided in, packed out) " + name, host(pdv), dv, t);
}

// Layouts: 3 sequences (37 < one tile, 150 = several tiles with a ragged end, 64 = one tile);
// 5 with an empty and a short one; 6 (same cuDNN graph bucket as 5: reuses its graphs); then
// uniform ones (cuDNN's dense graphs): 3 x 64, and 2 x 100 (not a multiple of a tile); last, a
// 600-token sequence (many tiles: the kernels' double-buffered loops) after a 129-token one.
const std::vector<std::vector<int32_t>> kLayouts = {
    {0, 37, 187, 251}, {0, 37, 37, 187, 200, 251}, {0, 37, 37, 187, 200, 240, 251},
    {0, 64, 128, 192}, {0, 100, 200}, {0, 129, 729}};

TEST_P(GpuAttention, MatchesCpuVarlen) {
  REQUIRE_GPU();
  const AttnCase c = GetParam();
#ifdef IEVO_CUDA
  if (c.backend == ops::AttentionBackend::Flash)
    std::printf("[gpu] flash forward: %s\n", cuda::flash::use_wgmma() ? "wgmma (sm_90a) and mma.sync" : "mma.sync");
#endif
  ops::set_attention_backend(c.backend);
  if (c.backend == ops::AttentionBackend::Cudnn) {
    try {  // skip cleanly where cuDNN attention is not built in or not usable
      Tensor q = Tensor::zeros({4, c.hq, c.hd}, c.dt, Device::CUDA), k = Tensor::zeros({4, c.hkv, c.hd}, c.dt, Device::CUDA);
      Tensor o = Tensor::empty({4, c.hq, c.hd}, c.dt, Device::CUDA), l = Tensor::empty({c.hq, 4}, DType::F32, Device::CUDA);
      ops::attention_forward(q, k, k, Tensor::from_vector(std::vector<int32_t>{0, 4}, {2}), 4, o, l);
    } catch (const Error& e) {
      if (std::string(e.what()).find("unavailable") != std::string::npos) GTEST_SKIP() << e.what();
      throw;
    }
  }
  for (size_t i = 0; i < kLayouts.size(); ++i)
    check_attention(c, kLayouts[i],
                    "S=" + std::to_string(kLayouts[i].size() - 1) + " N=" + std::to_string(kLayouts[i].back()));
  if (c.backend == ops::AttentionBackend::Cudnn) {
    // Exact graph shapes (no rounding of S and max_seqlen) give the same results.
    setenv("IEVO_CUDNN_ATTN_EXACT", "1", 1);
    check_attention(c, kLayouts[1], "S=5 exact");
    unsetenv("IEVO_CUDNN_ATTN_EXACT");
  }
}

std::vector<AttnCase> attn_cases() {
  using B = ops::AttentionBackend;
  std::vector<AttnCase> v;
  for (B b : {B::Flash, B::Cudnn}) {
    for (int hd : {64, 128}) {
      v.push_back({DType::BF16, hd, 8, 2, b});
      v.push_back({DType::BF16, hd, 2, 2, b});
    }
  }
  for (int hd : {64, 128}) {
    v.push_back({DType::F32, hd, 8, 2, B::Flash});
    v.push_back({DType::F32, hd, 2, 2, B::Flash});
  }
  v.push_back({DType::F32, 32, 4, 1, B::Flash});   // generic kernel, small hd
  v.push_back({DType::BF16, 32, 4, 1, B::Flash});  // generic kernel in bf16
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuAttention, ::testing::ValuesIn(attn_cases()),
                         [](const auto& i) { return attn_name(i.param); });

TEST(GpuAttentionErrors, SequenceLongerThanMaxSeqlen) {
  REQUIRE_GPU();
  Tensor q = rand({20, 2, 64}, 121).to(Device::CUDA), k = rand({20, 2, 64}, 122).to(Device::CUDA);
  Tensor out = Tensor::empty({20, 2, 64}, DType::F32, Device::CUDA);
  Tensor lse = Tensor::empty({2, 20}, DType::F32, Device::CUDA);
  Tensor cu = Tensor::from_vector(std::vector<int32_t>{0, 5, 20}, {3});
  EXPECT_THROW(ops::attention_forward(q, k, k, cu.to(Device::CUDA), 10, out, lse), Error);
  EXPECT_THROW(ops::attention_forward(q, k, k, cu, 10, out, lse), Error);
  // A host mirror is validated like host cu_seqlens, and must match the device tensor's size.
  EXPECT_THROW(ops::attention_forward(q, k, k, cu.to(Device::CUDA), 10, out, lse, cu), Error);
  Tensor good = Tensor::from_vector(std::vector<int32_t>{0, 10, 20}, {3});
  EXPECT_THROW(ops::attention_forward(q, k, k, good.to(Device::CUDA), 10, out, lse,
                                      Tensor::from_vector(std::vector<int32_t>{0, 20}, {2})),
               Error);
}


// ---------------------------------------------------------------------------------------------
// Vocabulary-parallel pieces (runtime/ops/vocab_parallel.h): the GPU against the CPU reference,
// the vocabulary split in parts as the tensor-parallel ranks hold it.

// Columns [c0, c1) of a 2-D f32 CPU tensor, contiguous.
Tensor cols(const Tensor& x, int64_t c0, int64_t c1) {
  const int64_t n = x.size(0), v = x.size(1);
  Tensor out = Tensor::empty({n, c1 - c0}, DType::F32);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = c0; j < c1; ++j) out.data<float>()[i * (c1 - c0) + j - c0] = x.data<float>()[i * v + j];
  return out;
}

TEST(GpuVocabParallel, EmbeddingRange) {
  REQUIRE_GPU();
  const int64_t vocab = 1000, d = 96, n = 555, parts = 4, vl = vocab / parts;
  Tensor ids = rand_ids(n, 60, 160);  // repeats; spread over the parts below
  for (int64_t i = 0; i < n; i += 3) ids.data<int32_t>()[i] += static_cast<int32_t>((i % parts) * vl);
  Tensor gids = ids.to(Device::CUDA);
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor table = rand({vocab, d}, 161), dout = rand({n, d}, 162), dtab = rand({vocab, d}, 163);
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t b = p * vl;
      Tensor part = seen(table, dt).slice(0, b, b + vl).clone(), out = Tensor::empty({n, d}, DType::F32);
      ops::embedding_forward_range(part, ids, b, vocab, out);
      Tensor gout = Tensor::empty({n, d}, dt, Device::CUDA);
      ops::embedding_forward_range(part.to(dt).to(Device::CUDA), gids, b, vocab, gout);
      EXPECT_EQ(test::max_abs_diff(host(gout), out), 0.0) << "masked gather is exact, part " << p;
      Tensor ref = seen(dtab, dt).slice(0, b, b + vl).clone();
      ops::embedding_backward_range(seen(dout, dt), ids, b, vocab, ref);
      Tensor g1 = gpu(dtab.slice(0, b, b + vl).clone(), dt), g2 = g1.clone();
      ops::embedding_backward_range(gpu(dout, dt), gids, b, vocab, g1);
      ops::embedding_backward_range(gpu(dout, dt), gids, b, vocab, g2, ids);  // ids checked on the host
      expect_close(std::string("embedding_backward_range ") + dn(dt) + " part " + std::to_string(p), host(g1),
                   ref, tol(dt));
      EXPECT_TRUE(bit_equal(g1, g2)) << "not deterministic, or ids_host changed the result";
    }
  }
  Tensor bad = ids.clone();
  bad.data<int32_t>()[17] = 1000;
  Tensor gout = Tensor::empty({n, d}, DType::F32, Device::CUDA);
  for (bool on_host : {false, true}) {  // found on the device, or in the ids' host copy
    try {
      ops::embedding_forward_range(rand({vl, d}, 164).to(Device::CUDA), on_host ? gids : bad.to(Device::CUDA), 0,
                                   vocab, gout, on_host ? bad : Tensor());
      ADD_FAILURE() << "no error for id 1000, on_host " << on_host;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("token id 1000 at position 17"), std::string::npos) << e.what();
    }
  }
}

TEST(GpuVocabParallel, CrossEntropyPieces) {
  REQUIRE_GPU();
  const int64_t n = 37, vocab = 1000, parts = 4, vl = vocab / parts;
  Tensor targets = rand_ids(n, static_cast<int32_t>(vocab), 170);
  targets.data<int32_t>()[3] = ops::kIgnoreIndex;
  Tensor gt = targets.to(Device::CUDA);
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor logits = seen(rand({n, vocab}, 171, -6, 6), dt);
    Tensor gathered = Tensor::empty({parts, 2, n}, DType::F32);
    Tensor ggathered = Tensor::empty({parts, 2, n}, DType::F32, Device::CUDA);
    for (int64_t p = 0; p < parts; ++p) {
      Tensor part = cols(logits, p * vl, (p + 1) * vl), stats = gathered.select0(p), gstats = ggathered.select0(p);
      ops::vocab_ce_local(part, targets, p * vl, vocab, stats);
      ops::vocab_ce_local(gpu(part, dt), gt, p * vl, vocab, gstats);
    }
    expect_close(std::string("vocab_ce_local stats ") + dn(dt), host(ggathered), gathered, kTolF32);
    Tensor lse = Tensor::empty({n}, DType::F32), glse = Tensor::empty({n}, DType::F32, Device::CUDA);
    int64_t count = 0, gcount = 0;
    const double sum = ops::vocab_ce_combine(gathered, targets, vocab, lse, &count);
    const double gsum = ops::vocab_ce_combine(ggathered, gt, vocab, glse, &gcount);
    EXPECT_EQ(count, n - 1);
    EXPECT_EQ(gcount, count);
    EXPECT_NEAR(gsum, sum, 1e-5 * sum);
    // The whole-vocabulary op on the GPU gives the same loss.
    Tensor gl = gpu(logits, dt), glosses = Tensor::empty({n}, DType::F32, Device::CUDA);
    EXPECT_NEAR(ops::cross_entropy_forward(gl, gt, glosses, nullptr), gsum, 1e-5 * sum);
    expect_close(std::string("vocab_ce_combine lse ") + dn(dt), host(glse), lse, kTolF32);
    Tensor dwhole = Tensor::empty({n, vocab}, DType::F32);
    ops::cross_entropy_backward(logits, targets, 0.5, dwhole);
    for (int64_t p = 0; p < parts; ++p) {
      Tensor part = cols(logits, p * vl, (p + 1) * vl), d = Tensor::empty({n, vl}, DType::F32);
      ops::vocab_ce_backward(part, targets, p * vl, lse, 0.5, d);
      EXPECT_LT(test::max_abs_diff(d, cols(dwhole, p * vl, (p + 1) * vl)), 1e-6);
      Tensor gpart = gpu(part, dt);
      ops::vocab_ce_backward(gpart, gt, p * vl, glse, 0.5, gpart);  // in place
      expect_close(std::string("vocab_ce_backward ") + dn(dt) + " part " + std::to_string(p), host(gpart), d,
                   tol(dt));
    }
  }
  Tensor bad = targets.clone();
  bad.data<int32_t>()[9] = 1000;
  Tensor gs = Tensor::empty({2, n}, DType::F32, Device::CUDA);
  try {
    ops::vocab_ce_local(rand({n, vl}, 172).to(Device::CUDA), bad.to(Device::CUDA), 0, vocab, gs);
    ADD_FAILURE() << "no error for target 1000";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("target 1000 at row 9"), std::string::npos) << e.what();
  }
}

TEST(GpuVocabParallel, SwapLeadingDims) {
  REQUIRE_GPU();
  for (DType dt : {DType::F32, DType::BF16}) {
    Tensor x = seen(rand({6, 4, 3, 16}, 180), dt), y = Tensor::empty({4, 6, 3, 16}, DType::F32);
    ops::swap_leading_dims(x, y);
    Tensor gy = Tensor::empty({4, 6, 3, 16}, dt, Device::CUDA);
    ops::swap_leading_dims(gpu(x, dt), gy);
    EXPECT_EQ(test::max_abs_diff(host(gy), y), 0.0) << dn(dt);
    // Column slices of wider matrices, viewed (Ulysses' joint q, k, v), against the CPU.
    Tensor wx = seen(rand({6, 4 * 48 + 16}, 181), dt), wo = seen(rand({4 * 6, 80}, 182), dt);
    Tensor cx = wx.slice(1, 8, 8 + 192).view({6, 4, 48}), co = wo.slice(1, 16, 64).view({4, 6, 48});
    ops::swap_leading_dims(cx, co);
    Tensor gwx = gpu(wx, dt), gwo = gpu(seen(rand({4 * 6, 80}, 182), dt), dt);
    Tensor gco = gwo.slice(1, 16, 64).view({4, 6, 48});
    ops::swap_leading_dims(gwx.slice(1, 8, 8 + 192).view({6, 4, 48}), gco);
    EXPECT_EQ(test::max_abs_diff(host(gwo), wo), 0.0) << "strided " << dn(dt);
  }
}

}  // namespace
}  // namespace ievo
