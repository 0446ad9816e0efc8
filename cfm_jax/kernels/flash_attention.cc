// XLA FFI handlers for causal softmax attention on CPU (cfm_jax/kernels/flash_attention.py):
//   o[t] = sum_{u <= t} softmax_u(scale q[t] . k[u]) v[u]       per query head h, kv head h / (H / K)
// q: (b, s, H, d); k: (b, s, K, d); v: (b, s, K, dv); o: (b, s, H, dv); lse: (b, H, s); float32.
//
// Flash attention: queries and keys in blocks of kBlock, the softmax kept online per query row
// (running max m and sum l), so no (s, s) score matrix is ever formed and the scratch is a few
// (kBlock, kBlock) tiles per thread, whatever the length; key blocks past a query block's diagonal
// are skipped. The five products per tile run as single-threaded MKL sgemm calls on the operands in
// place (row strides H d, K d, ...: no transposes), the softmax in W-lane vectors; threads take whole
// work units (forward: one query block of one head; backward: one kv head of one sequence, which then
// owns its dk, dv and its heads' dq), each summing in a fixed order: the bits do not depend on the
// number of threads.
//
// The backward pass recomputes each tile's probabilities from q, k and the forward's row
// log-sum-exp lse = m + log(l):  p = exp(s - lse),  dp = do v^T,  ds = p (dp - D) with
// D[t] = do[t] . o[t],  dq += scale ds k,  dk += scale ds^T q,  dv += p^T do.
#include <cmath>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
using SetThreadsLocal = int (*)(int);
static Sgemm sgemm = nullptr;
static SetThreadsLocal set_threads_local = nullptr;

extern "C" void cfm_attention_set_mkl(void* gemm, void* threads_local) {
  sgemm = reinterpret_cast<Sgemm>(gemm);
  set_threads_local = reinterpret_cast<SetThreadsLocal>(threads_local);
}

// Queries and keys per tile, forward and backward (measured at 8 x 512 tokens, 4 heads of 128).
constexpr int64_t kFwdQ = 128, kFwdK = 128, kBwdQ = 512, kBwdK = 64;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr float kNegInf = -__builtin_inff();

// A row-major matrix view: element (i, j) at p[i * ld + j].
struct Mat {
  const float* p;
  int64_t ld;
};
struct MutMat {
  float* p;
  int64_t ld;
};

// C (m, n) = alpha op(A) op(B) + beta C, single-threaded in the calling thread.
static void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, Mat a, Mat b, float beta, MutMat c) {
  sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, alpha, a.p, a.ld, b.p, b.ld, beta, c.p, c.ld);
}

// Runs fn in MKL's single-threaded mode on this thread, then restores the thread's setting (XLA's
// own threads run the model's other MKL products multi-threaded).
template <typename Fn>
static void mkl_sequential(Fn fn) {
  const int previous = set_threads_local(1);
  fn();
  set_threads_local(previous);
}

// W lanes of x[j..) with lanes at or past `valid` set to -inf (x may end before the lanes do).
static inline vf load_masked(const float* x, int64_t j, int64_t valid) {
  vf v;
  if (j + W <= valid) {
    std::memcpy(&v, x + j, sizeof v);
    return v;
  }
  for (int64_t i = 0; i < W; ++i) v[i] = j + i < valid ? x[j + i] : kNegInf;
  return v;
}

static inline void store(float* x, int64_t j, int64_t n, vf v) {  // lanes of x[j..n)
  if (j + W <= n) {
    std::memcpy(x + j, &v, sizeof v);
  } else {
    for (int64_t i = 0; j + i < n; ++i) x[j + i] = v[i];
  }
}

static inline float lane_max(vf v) {
  float m = v[0];
  for (int64_t i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

static float row_max(const float* x, int64_t valid) {
  vf m = vf{} + kNegInf;
  for (int64_t j = 0; j < valid; j += W) {
    const vf v = load_masked(x, j, valid);
    m = v > m ? v : m;
  }
  return lane_max(m);
}

// x[j] <- exp(x[j] - shift) for j < valid, 0 for valid <= j < n; returns the sum (fixed order).
static float exp_row(float* x, int64_t n, int64_t valid, float shift) {
  vf sum = {};
  for (int64_t j = 0; j < n; j += W) {
    const vf e = exp_lanes(load_masked(x, j, valid) - shift);  // exp(-inf) = 0 past `valid`
    sum += e;
    store(x, j, n, e);
  }
  return lane_sum(sum);
}

struct Dims {
  int64_t b, s, H, K, d, dv;
  int64_t group() const { return H / K; }
  int64_t blocks(int64_t size) const { return (s + size - 1) / size; }
};

// Pointers to row t = 0 of sequence bi, head h, and the row strides, of each operand.
struct Operands {
  Dims n;
  float scale;
  Mat q(const float* p, int64_t bi, int64_t h) const { return {p + (bi * n.s * n.H + h) * n.d, n.H * n.d}; }
  Mat k(const float* p, int64_t bi, int64_t g) const { return {p + (bi * n.s * n.K + g) * n.d, n.K * n.d}; }
  Mat v(const float* p, int64_t bi, int64_t g) const { return {p + (bi * n.s * n.K + g) * n.dv, n.K * n.dv}; }
  Mat o(const float* p, int64_t bi, int64_t h) const { return {p + (bi * n.s * n.H + h) * n.dv, n.H * n.dv}; }
};

static inline Mat rows(Mat m, int64_t r) { return {m.p + r * m.ld, m.ld}; }
static inline MutMat rows(MutMat m, int64_t r) { return {m.p + r * m.ld, m.ld}; }
static inline MutMat mut(Mat m) { return {const_cast<float*>(m.p), m.ld}; }

// One query block (rows r0..r0+nr of head h in sequence bi): o rows and their lse.
static void forward_block(const Operands& op, const float* q, const float* k, const float* v, float* o, float* lse,
                          int64_t bi, int64_t h, int64_t r0, std::vector<float>& scratch) {
  const Dims& n = op.n;
  const int64_t nr = std::min(kFwdQ, n.s - r0), g = h / n.group();
  float* tile = scratch.data();            // (nr, kFwdK) scores, then probabilities
  float* acc = tile + kFwdQ * kFwdK;      // (nr, dv) unnormalized output
  float* m = acc + kFwdQ * n.dv;          // (nr,) running max
  float* l = m + kFwdQ;                   // (nr,) running sum
  std::fill(acc, acc + nr * n.dv, 0.0f);
  std::fill(m, m + nr, kNegInf);
  std::fill(l, l + nr, 0.0f);
  const Mat qb = rows(op.q(q, bi, h), r0), kh = op.k(k, bi, g), vh = op.v(v, bi, g);
  for (int64_t c0 = 0; c0 < r0 + nr; c0 += kFwdK) {
    const int64_t nc = std::min(kFwdK, r0 + nr - c0);
    gemm(false, true, nr, nc, n.d, op.scale, qb, rows(kh, c0), 0.0f, {tile, kFwdK});
    for (int64_t r = 0; r < nr; ++r) {
      float* row = tile + r * kFwdK;
      const int64_t valid = std::min(nc, r0 + r - c0 + 1);  // keys c0 + j <= query r0 + r
      if (valid <= 0) {
        std::fill(row, row + nc, 0.0f);
        continue;
      }
      const float m_new = std::max(m[r], row_max(row, valid));
      const float decay = std::exp(m[r] - m_new);  // 0 on the first block (m = -inf)
      l[r] = l[r] * decay + exp_row(row, nc, valid, m_new);
      m[r] = m_new;
      if (decay != 1.0f)
        for (int64_t j = 0; j < n.dv; ++j) acc[r * n.dv + j] *= decay;
    }
    gemm(false, false, nr, n.dv, nc, 1.0f, {tile, kFwdK}, rows(vh, c0), 1.0f, {acc, n.dv});
  }
  const MutMat ob = rows(mut(op.o(o, bi, h)), r0);
  float* lse_row = lse + (bi * n.H + h) * n.s + r0;
  for (int64_t r = 0; r < nr; ++r) {
    const float inv = 1.0f / l[r];
    for (int64_t j = 0; j < n.dv; ++j) ob.p[r * ob.ld + j] = acc[r * n.dv + j] * inv;
    lse_row[r] = m[r] + std::log(l[r]);
  }
}

// One kv head g of sequence bi: its dk, dv rows and its query heads' dq rows, all written here only.
static void backward_unit(const Operands& op, const float* q, const float* k, const float* v, const float* o,
                          const float* lse, const float* dout, float* dq, float* dk, float* dv, int64_t bi,
                          int64_t g, std::vector<float>& scratch) {
  const Dims& n = op.n;
  const int64_t G = n.group();
  float* p = scratch.data();          // (kBwdQ, kBwdK) probabilities
  float* ds = p + kBwdQ * kBwdK;      // (kBwdQ, kBwdK) dp, then ds
  float* D = ds + kBwdQ * kBwdK;      // (G, s) do . o per row
  for (int64_t hi = 0; hi < G; ++hi) {
    const int64_t h = g * G + hi;
    const Mat ob = op.o(o, bi, h), db = op.o(dout, bi, h);
    for (int64_t t = 0; t < n.s; ++t) {
      float sum = 0.0f;
      for (int64_t j = 0; j < n.dv; ++j) sum += ob.p[t * ob.ld + j] * db.p[t * db.ld + j];
      D[hi * n.s + t] = sum;
    }
    const MutMat dqh = mut(op.q(dq, bi, h));
    for (int64_t t = 0; t < n.s; ++t) std::fill(dqh.p + t * dqh.ld, dqh.p + t * dqh.ld + n.d, 0.0f);
  }
  const Mat kh = op.k(k, bi, g), vh = op.v(v, bi, g);
  const MutMat dkh = mut(op.k(dk, bi, g)), dvh = mut(op.v(dv, bi, g));
  for (int64_t t = 0; t < n.s; ++t) {
    std::fill(dkh.p + t * dkh.ld, dkh.p + t * dkh.ld + n.d, 0.0f);
    std::fill(dvh.p + t * dvh.ld, dvh.p + t * dvh.ld + n.dv, 0.0f);
  }
  for (int64_t c0 = 0; c0 < n.s; c0 += kBwdK) {  // key block: its dk, dv summed over the queries after it
    const int64_t nc = std::min(kBwdK, n.s - c0);
    for (int64_t hi = 0; hi < G; ++hi) {
      const int64_t h = g * G + hi;
      const Mat qh = op.q(q, bi, h), doh = op.o(dout, bi, h);
      const MutMat dqh = mut(op.q(dq, bi, h));
      const float* lse_h = lse + (bi * n.H + h) * n.s;
      for (int64_t r0 = c0; r0 < n.s; r0 += kBwdQ) {  // the queries at or past the key block
        const int64_t nr = std::min(kBwdQ, n.s - r0);
        gemm(false, true, nr, nc, n.d, op.scale, rows(qh, r0), rows(kh, c0), 0.0f, {p, kBwdK});
        gemm(false, true, nr, nc, n.dv, 1.0f, rows(doh, r0), rows(vh, c0), 0.0f, {ds, kBwdK});
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t valid = std::max<int64_t>(0, std::min(nc, r0 + r - c0 + 1));
          float* prow = p + r * kBwdK;
          float* srow = ds + r * kBwdK;
          exp_row(prow, nc, valid, lse_h[r0 + r]);
          const float Dr = D[hi * n.s + r0 + r];
          for (int64_t j = 0; j < nc; ++j) srow[j] = prow[j] * (srow[j] - Dr);
        }
        gemm(true, false, nc, n.dv, nr, 1.0f, {p, kBwdK}, rows(doh, r0), 1.0f, rows(dvh, c0));
        gemm(true, false, nc, n.d, nr, op.scale, {ds, kBwdK}, rows(qh, r0), 1.0f, rows(dkh, c0));
        gemm(false, false, nr, n.d, nc, op.scale, {ds, kBwdK}, rows(kh, c0), 1.0f, rows(dqh, r0));
      }
    }
  }
}

// Shapes: q (b, s, H, d), k (b, s, K, d), v (b, s, K, dv), H a multiple of K; the forward's o and lse
// (and the backward's do) must fit them. An error names the first that does not.
static ffi::Error check(Dims& n, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v) {
  if (sgemm == nullptr || set_threads_local == nullptr) return ffi::Error::Internal("cfm_flash_attention: no MKL set");
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("cfm_flash_attention: q, k, v must be 4-D (batch, seq, heads, dim)");
  n = {qd[0], qd[1], qd[2], kd[2], qd[3], vd[3]};
  if (kd[0] != n.b || kd[1] != n.s || kd[3] != n.d || vd[0] != n.b || vd[1] != n.s || vd[2] != n.K)
    return ffi::Error::InvalidArgument("cfm_flash_attention: k (b, s, K, d) or v (b, s, K, dv) does not fit q (b, s, H, d)");
  if (n.K < 1 || n.H % n.K)
    return ffi::Error::InvalidArgument("cfm_flash_attention: kv heads must divide query heads");
  if (n.d < 1 || n.dv < 1)  // zero row strides: BLAS would refuse the tile products
    return ffi::Error::InvalidArgument("cfm_flash_attention: head dimensions must be >= 1");
  if (n.H * std::max(n.d, n.dv) > (int64_t{1} << 30))
    return ffi::Error::InvalidArgument("cfm_flash_attention: a row exceeds the 32-bit BLAS interface");
  return ffi::Error::Success();
}

static bool shaped(ffi::AnyBuffer::Dimensions dims, std::initializer_list<int64_t> want) {
  return dims.size() == want.size() && std::equal(dims.begin(), dims.end(), want.begin());
}

static ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                          ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Dims n;
  if (auto e = check(n, q, k, v); e.failure()) return e;
  if (!shaped(o->dimensions(), {n.b, n.s, n.H, n.dv}) || !shaped(lse->dimensions(), {n.b, n.H, n.s}))
    return ffi::Error::InvalidArgument("cfm_flash_attention: o must be (b, s, H, dv) and lse (b, H, s)");
  const Operands op{n, scale};
  const int64_t blocks = n.blocks(kFwdQ), units = n.b * n.H * blocks;
  parallel_for(units, [&](int64_t i) {  // a unit: one query block of one head (a head's largest first)
    thread_local std::vector<float> scratch;
    scratch.resize(kFwdQ * kFwdK + kFwdQ * n.dv + 2 * kFwdQ);
    const int64_t r0 = (blocks - 1 - i % blocks) * kFwdQ, bh = i / blocks;
    mkl_sequential([&] {
      forward_block(op, q.typed_data(), k.typed_data(), v.typed_data(), o->typed_data(), lse->typed_data(),
                    bh / n.H, bh % n.H, r0, scratch);
    });
  });
  return ffi::Error::Success();
}

static ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                           ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                           ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Dims n;
  if (auto e = check(n, q, k, v); e.failure()) return e;
  const std::initializer_list<int64_t> o_shape = {n.b, n.s, n.H, n.dv};
  if (!shaped(o.dimensions(), o_shape) || !shaped(dout.dimensions(), o_shape) ||
      !shaped(lse.dimensions(), {n.b, n.H, n.s}))
    return ffi::Error::InvalidArgument("cfm_flash_attention: o and do must be (b, s, H, dv) and lse (b, H, s)");
  const Operands op{n, scale};
  parallel_for(n.b * n.K, [&](int64_t i) {
    thread_local std::vector<float> scratch;
    scratch.resize(2 * kBwdQ * kBwdK + n.group() * n.s);
    mkl_sequential([&] {
      backward_unit(op, q.typed_data(), k.typed_data(), v.typed_data(), o.typed_data(), lse.typed_data(),
                    dout.typed_data(), dq->typed_data(), dk->typed_data(), dv->typed_data(), i / n.K, i % n.K, scratch);
    });
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmFlashAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmFlashAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
