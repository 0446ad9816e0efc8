// XLA FFI handlers for a batch-1 FATReLU FFN over a subset of its neurons, reading their weight rows
// in place (cfm_jax/kernels/active_rows.py):
//   y = sum_{i in set} fatrelu(up_rows[i] . x, t) down[i]
// x: (d,); up_rows, down: (f, d) (one contiguous row per neuron); y: (d,); float32. Two handlers:
//   cfm_active_rows     the set is given: active (K,) int32 (out-of-range entries ignored)
//   cfm_predicted_rows  the set is predicted from x by a low-rank predictor: neuron i is in it iff
//                       ((proj_rows @ x) @ lift)[i] > cut[i], with proj_rows (r, d), lift (r, f),
//                       cut (f,) (cfm_jax/layers/active_predictor.py)
// Unlike a gather (XLA's take, PyTorch's index_select), no copy of the rows is written before they
// are used: each row is streamed once, so the bytes read are 2 K d floats (plus the predictor's
// (d + f) r). The set is cut into chunks that the threads take as they free up; each chunk's partial
// sum is kept apart and they are added in chunk order, so the result does not depend on which thread
// ran which chunk (nor on the number of CPUs).

#include <memory>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

static inline float dot(const float* a, const float* b, int64_t n) {
  vf acc0 = {}, acc1 = {};  // two chains: the adds of one need not wait for the other's
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    acc0 += load(a + j) * load(b + j);
    acc1 += load(a + j + W) * load(b + j + W);
  }
  for (; j + W <= n; j += W) acc0 += load(a + j) * load(b + j);
  float s = lane_sum(acc0 + acc1);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// out += h w over d floats.
static inline void axpy(float h, const float* w, float* out, int64_t d) {
  const vf hv = vf{} + h;
  int64_t j = 0;
  for (; j + W <= d; j += W) store(out + j, load(out + j) + hv * load(w + j));
  for (; j < d; ++j) out[j] += h * w[j];
}

// Partial y over the neurons list[0, n) into out (d,).
static void rows(const float* x, const float* up, const float* down, const int32_t* list, int64_t n, int64_t d,
                 int64_t f, float threshold, float* out) {
  std::fill(out, out + d, 0.0f);
  for (int64_t a = 0; a < n; ++a) {
    const int64_t i = list[a];
    if (i < 0 || i >= f) continue;  // out-of-range indices contribute nothing
    if (a + 1 < n && list[a + 1] >= 0 && list[a + 1] < f) {
      // The next neuron's rows start pages away, where the hardware prefetcher has no stream yet: ask
      // for their first lines now and it picks up from there (10-20 % faster measured here than no
      // prefetch, and than prefetching whole rows).
      for (int line = 0; line < 4; ++line) {
        __builtin_prefetch(up + list[a + 1] * d + line * 16);
        __builtin_prefetch(down + list[a + 1] * d + line * 16);
      }
    }
    const float h = dot(up + i * d, x, d);
    if (!(h > threshold)) continue;
    axpy(h, down + i * d, out, d);
  }
}

// Runs fn(c) for c in [0, count) on this thread and XLA's intra-op thread pool (the threads XLA runs
// its own ops on: none are added to compete for the CPUs, and starting a thread per call would cost
// ~35 us here, a tenth of the whole FFN at ratio 0.1), each thread taking the next unclaimed c, and
// returns when all are done. A pool thread that wakes late finds less or nothing left to take. fn(c)
// must write only its own outputs, so results do not depend on which thread ran which c.
template <typename Fn>
static void chunked(ffi::ThreadPool& pool, int64_t count, Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();  // outlives this call if a pool thread runs its task late
  auto work = [state, count, &fn] {       // fn is only used while this call waits for it
    for (int64_t c; (c = state->next.fetch_add(1)) < count;) {
      fn(c);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(count, usable_cpus()); ++t) pool.Schedule(decltype(work)(work));  // a copy each
  work();
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// y (d,) = the sum over c in [0, chunks) of part(c, out), each writing its partial sum into its own
// out (d,), the chunks run by `chunked` and their sums added in chunk order.
template <typename Part>
static void sum_of_chunks(ffi::ThreadPool& pool, int64_t chunks, int64_t d, float* y, Part part) {
  std::vector<float> partial(chunks * d);
  auto one = [&](int64_t c) { part(c, partial.data() + c * d); };
  chunked(pool, chunks, one);
  std::fill(y, y + d, 0.0f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < d; ++j) y[j] += partial[c * d + j];
}

constexpr int64_t kChunks = 16;  // work units per call: enough to balance two threads, few partial sums to add

static bool rows_shapes_ok(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& up, ffi::Buffer<ffi::F32>& down,
                           ffi::ResultBuffer<ffi::F32>& y) {
  auto ud = up.dimensions(), dd = down.dimensions();
  const int64_t d = x.element_count();
  return ud.size() == 2 && ud[1] == d && dd.size() == 2 && dd[0] == ud[0] && dd[1] == d && y->element_count() == d;
}

static ffi::Error ActiveRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> down,
                             ffi::Buffer<ffi::S32> active, ffi::ResultBuffer<ffi::F32> y, float threshold) {
  if (!rows_shapes_ok(x, up, down, y))
    return ffi::Error::InvalidArgument("cfm_active_rows: x (d,), up_rows and down (f, d), y (d,) expected");
  const int64_t d = x.element_count(), f = up.dimensions()[0], K = active.element_count();
  const int64_t chunks = std::max<int64_t>(1, std::min(kChunks, K / 32));  // at least 32 neurons per chunk
  sum_of_chunks(pool, chunks, d, y->typed_data(), [&](int64_t c, float* out) {
    const int64_t begin = K * c / chunks, end = K * (c + 1) / chunks;
    rows(x.typed_data(), up.typed_data(), down.typed_data(), active.typed_data() + begin, end - begin, d, f, threshold,
         out);
  });
  return ffi::Error::Success();
}

static ffi::Error PredictedRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> proj, ffi::Buffer<ffi::F32> lift,
                                ffi::Buffer<ffi::F32> cut, ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> down,
                                ffi::ResultBuffer<ffi::F32> y, float threshold) {
  if (!rows_shapes_ok(x, up, down, y))
    return ffi::Error::InvalidArgument("cfm_predicted_rows: x (d,), up_rows and down (f, d), y (d,) expected");
  const int64_t d = x.element_count(), f = up.dimensions()[0];
  auto pd = proj.dimensions(), ld = lift.dimensions();
  if (pd.size() != 2 || pd[1] != d || ld.size() != 2 || ld[0] != pd[0] || ld[1] != f || cut.element_count() != f)
    return ffi::Error::InvalidArgument("cfm_predicted_rows: proj_rows (r, d), lift (r, f), cut (f,) expected");
  const int64_t r = pd[0];
  std::vector<float> z(r);  // the rank-r code of x
  for (int64_t k = 0; k < r; ++k) z[k] = dot(proj.typed_data() + k * d, x.typed_data(), d);
  // Chunks of the neuron range: each estimates its neurons' pre-activations, then reads its
  // candidates' rows. Neuron indices carry no meaning (a random init), so chunks get about equal
  // shares of the firing neurons, and the two threads take chunks as they finish.
  const int64_t chunks = std::max<int64_t>(1, std::min(kChunks, f / 64));
  sum_of_chunks(pool, chunks, d, y->typed_data(), [&](int64_t c, float* out) {
    const int64_t begin = f * c / chunks, end = f * (c + 1) / chunks;
    std::vector<float> p(end - begin, 0.0f);  // estimated pre-activations: sum_k z[k] lift[k]
    for (int64_t k = 0; k < r; ++k) axpy(z[k], lift.typed_data() + k * f + begin, p.data(), end - begin);
    std::vector<int32_t> candidates;
    for (int64_t i = begin; i < end; ++i)
      if (p[i - begin] > cut.typed_data()[i]) candidates.push_back(int32_t(i));
    rows(x.typed_data(), up.typed_data(), down.typed_data(), candidates.data(), int64_t(candidates.size()), d, f,
         threshold, out);
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmActiveRows, ActiveRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("threshold"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmPredictedRows, PredictedRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("threshold"));
