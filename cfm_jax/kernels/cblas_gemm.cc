// XLA FFI handlers for row-major float32 matrices through MKL's CBLAS sgemm / sgemm_batch_strided,
// whose addresses the Python side hands over (cfm_jax/kernels/cblas.py loads them from MKL's runtime):
//   CfmGemm         C[i] = op(A[i]) @ op(B[i]), 2-D or batched 3-D;
//   CfmGroupedGemm  rows of A in consecutive groups of group_sizes[g] rows, each group times its own
//                   matrix (the MoE's experts): one sgemm per non-empty group, sizes read at run time.
#include <climits>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using Sgemm = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
using SgemmBatchStrided = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                                   const float* a, int lda, int stride_a, const float* b, int ldb,
                                   int stride_b, float beta, float* c, int ldc, int stride_c, int batch);
static Sgemm sgemm = nullptr;
static SgemmBatchStrided sgemm_batch = nullptr;

extern "C" void cfm_set_sgemm(void* gemm, void* batch) {
  sgemm = reinterpret_cast<Sgemm>(gemm);
  sgemm_batch = reinterpret_cast<SgemmBatchStrided>(batch);
}

static ffi::Error Gemm(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c, bool trans_a,
                       bool trans_b) {
  if (sgemm == nullptr || sgemm_batch == nullptr) return ffi::Error::Internal("cfm_gemm: no sgemm set");
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("cfm_gemm: float32 operands only");
  auto ad = a.dimensions(), bd = b.dimensions();
  const size_t rank = ad.size();
  if ((rank != 2 && rank != 3) || bd.size() != rank)
    return ffi::Error::InvalidArgument("cfm_gemm: operands must both be 2-D or both 3-D");
  const int64_t batch = rank == 3 ? ad[0] : 1;
  if (rank == 3 && bd[0] != batch) return ffi::Error::InvalidArgument("cfm_gemm: batch sizes differ");
  const int64_t a0 = ad[rank - 2], a1 = ad[rank - 1], b0 = bd[rank - 2], b1 = bd[rank - 1];
  const int64_t m = trans_a ? a1 : a0, k = trans_a ? a0 : a1, n = trans_b ? b0 : b1;
  if ((trans_b ? b1 : b0) != k) return ffi::Error::InvalidArgument("cfm_gemm: contracting sizes differ");
  if (a0 * a1 > INT_MAX || b0 * b1 > INT_MAX || m * n > INT_MAX || batch > INT_MAX)
    return ffi::Error::InvalidArgument("cfm_gemm: a matrix exceeds the 32-bit BLAS interface");
  float* cp = static_cast<float*>(c->untyped_data());
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum: zeros (BLAS would reject the zero leading dimensions)
    for (int64_t i = 0; i < batch * m * n; ++i) cp[i] = 0.0f;
    return ffi::Error::Success();
  }
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  const float* ap = static_cast<const float*>(a.untyped_data());
  const float* bp = static_cast<const float*>(b.untyped_data());
  if (rank == 2) {
    sgemm(kRowMajor, ta, tb, m, n, k, 1.0f, ap, a1, bp, b1, 0.0f, cp, n);
  } else {
    sgemm_batch(kRowMajor, ta, tb, m, n, k, 1.0f, ap, a1, a0 * a1, bp, b1, b0 * b1, 0.0f, cp, n, m * n, batch);
  }
  return ffi::Error::Success();
}

// contract = false: A (M, k), B (G, k, n) or (G, n, k) if trans_b -> C (M, n),
//   C[rows of g] = A[rows of g] @ op(B[g]); rows past the last group are zero.
// contract = true:  A (M, k), B (M, n) -> C (G, k, n), C[g] = A[rows of g]^T @ B[rows of g]
//   (the weight gradient of the above); a group without rows gets zeros.
static ffi::Error GroupedGemm(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::S32> sizes,
                              ffi::Result<ffi::AnyBuffer> c, bool trans_b, bool contract) {
  if (sgemm == nullptr) return ffi::Error::Internal("cfm_grouped_gemm: no sgemm set");
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("cfm_grouped_gemm: float32 operands only");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const int64_t groups = sizes.element_count();
  if (ad.size() != 2 || bd.size() != (contract ? 2u : 3u) || cd.size() != (contract ? 3u : 2u))
    return ffi::Error::InvalidArgument("cfm_grouped_gemm: bad operand ranks");
  const int64_t rows = ad[0], k = ad[1];
  const int64_t n = contract ? bd[1] : (trans_b ? bd[1] : bd[2]);
  if (contract ? bd[0] != rows : (bd[0] != groups || (trans_b ? bd[2] : bd[1]) != k))
    return ffi::Error::InvalidArgument("cfm_grouped_gemm: operand shapes do not fit");
  if (rows * k > INT_MAX || rows * n > INT_MAX || k * n > INT_MAX)
    return ffi::Error::InvalidArgument("cfm_grouped_gemm: a matrix exceeds the 32-bit BLAS interface");
  const int32_t* sz = sizes.typed_data();
  const float* ap = static_cast<const float*>(a.untyped_data());
  const float* bp = static_cast<const float*>(b.untyped_data());
  float* cp = static_cast<float*>(c->untyped_data());
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  int64_t start = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t m = sz[g] < 0 ? 0 : (sz[g] < rows - start ? sz[g] : rows - start);  // clipped to A
    if (contract) {
      float* out = cp + g * k * n;
      if (m == 0 || k == 0 || n == 0) {
        for (int64_t i = 0; i < k * n; ++i) out[i] = 0.0f;
      } else {
        sgemm(kRowMajor, kTrans, kNoTrans, k, n, m, 1.0f, ap + start * k, k, bp + start * n, n, 0.0f, out, n);
      }
    } else if (m > 0 && n > 0) {
      float* out = cp + start * n;
      if (k == 0) {
        for (int64_t i = 0; i < m * n; ++i) out[i] = 0.0f;
      } else {
        sgemm(kRowMajor, kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f, ap + start * k, k,
              bp + g * k * n, trans_b ? k : n, 0.0f, out, n);
      }
    }
    start += m;
  }
  if (!contract)
    for (int64_t i = start * n; i < rows * n; ++i) cp[i] = 0.0f;
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmGroupedGemm, GroupedGemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_b")
                                  .Attr<bool>("contract"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
