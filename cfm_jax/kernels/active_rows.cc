// XLA FFI handler for a batch-1 FATReLU FFN over a given set of neurons, reading their weight rows in
// place (cfm_jax/kernels/active_rows.py):
//   y = sum_{i in active} fatrelu(up_rows[i] . x, t) down[i]
// x: (d,); up_rows, down: (f, d) (one contiguous row per neuron); active: (K,) int32; y: (d,); float32.
// Unlike a gather (XLA's take, PyTorch's index_select), no copy of the rows is written before they
// are used: each row is streamed once, so the bytes read are 2 K d floats. Two threads take the two
// halves of the active list and their partial sums are added in a fixed order.
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Partial y over active[begin, end) into out (d,).
static void rows(const float* x, const float* up, const float* down, const int32_t* active, int64_t begin,
                 int64_t end, int64_t d, int64_t f, float threshold, float* out) {
  std::fill(out, out + d, 0.0f);
  const int64_t body = d / W * W;
  for (int64_t a = begin; a < end; ++a) {
    const int64_t i = active[a];
    if (i < 0 || i >= f) continue;  // out-of-range indices contribute nothing
    const float* u = up + i * d;
    vf acc = {};
    for (int64_t j = 0; j < body; j += W) acc += load(u + j) * load(x + j);
    float h = lane_sum(acc);
    for (int64_t j = body; j < d; ++j) h += u[j] * x[j];
    if (!(h > threshold)) continue;
    const float* w = down + i * d;
    for (int64_t j = 0; j < d; ++j) out[j] += h * w[j];
  }
}

static ffi::Error ActiveRows(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> down,
                             ffi::Buffer<ffi::S32> active, ffi::ResultBuffer<ffi::F32> y, float threshold) {
  auto ud = up.dimensions();
  const int64_t d = x.element_count(), K = active.element_count();
  if (ud.size() != 2 || ud[1] != d || down.dimensions().size() != 2 || down.dimensions()[0] != ud[0] ||
      down.dimensions()[1] != d || y->element_count() != d)
    return ffi::Error::InvalidArgument("cfm_active_rows: x (d,), up_rows and down (f, d), y (d,) expected");
  const int64_t f = ud[0];
  std::vector<float> partial(2 * d);
  const int64_t half = K / 2;
  std::thread second([&] {
    rows(x.typed_data(), up.typed_data(), down.typed_data(), active.typed_data(), half, K, d, f, threshold,
         partial.data() + d);
  });
  rows(x.typed_data(), up.typed_data(), down.typed_data(), active.typed_data(), 0, half, d, f, threshold,
       partial.data());
  second.join();
  float* out = y->typed_data();
  for (int64_t j = 0; j < d; ++j) out[j] = partial[j] + partial[d + j];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmActiveRows, ActiveRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("threshold"));
