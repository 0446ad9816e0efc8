// XLA FFI handlers for Mamba's selective scan on CPU (cfm_jax/kernels/selective_scan.py):
//   h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t,   y_t = C_t . h_t        (per channel e, state n)
// u, dt: (b, L, E); A: (E, N); B, C: (b, L, N); h: (b, E, N); all float32, row-major.
//
// Work is split into (sequence, block of W channels) items over a few threads. Inside an item the
// W channels are the vector lanes, the N states a loop, time the outer loop: the state (N x W) and
// its decays stay in L1 and nothing of size (L, E, N) is ever written to memory. The backward pass
// runs the forward again, keeping the state every kChunk tokens, then walks each chunk backwards
// from its recomputed states.
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

constexpr int64_t W = 16;       // channels per item: the vector lanes (lane_sum assumes 16)
constexpr int64_t kChunk = 64;  // tokens between the states the backward pass keeps
constexpr int64_t kGroups = 16; // work units of the backward pass (see Backward)

// W floats as one value (GCC/Clang vector extension): AVX-512 registers where the CPU has them,
// split into narrower ones where not.
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

// exp(x) lane-wise, written so the compiler keeps it in vector registers: Cephes' expf (range
// reduction by ln 2 in two parts, degree-6 polynomial), within 1 ulp of expf over [-87.3, 88] (the
// scan itself only uses x <= 0: dt > 0, A < 0); 0 below -87.3, where expf turns denormal; e^88
// between 88 and 88.72 (2^n must stay a normal float); inf above; NaN for NaN.
static inline vf exp_lanes(vf x) {
  const vf lo = vf{} - 87.33654f, hi = vf{} + 88.0f;
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  xc = x == x ? xc : vf{};  // NaN lanes computed as 0, then restored below: no NaN reaches the int conversion
  const vf shift = vf{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (xc * 1.44269504088896341f + shift) - shift;
  vf r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) * (1 << 23);  // 2^n, n in [-126, 127]
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const vf inf = vf{} + __builtin_inff();
  vf out = x < lo ? vf{} : p * scale;
  out = x > 88.72283f ? inf : out;
  return x == x ? out : x;
}

typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

static inline float lane_sum(vf v) {  // halves added in a fixed order: the same result every run
  vf8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof lo8);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof lo8, sizeof hi8);
  const vf8 s8 = lo8 + hi8;
  vf4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof lo4, sizeof hi4);
  const vf4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

struct Scan {
  int64_t b, L, E, N;
  const float *u, *dt, *A, *B, *C, *h0;
};

// One item's decay rates and state, lanes past E zero (their dt is zero too: decay 1, no input).
struct Item {
  int64_t bi, e0, lanes;
  std::vector<vf> At, h;  // (N,) of W lanes

  Item(const Scan& s, int64_t index) : bi(index / ((s.E + W - 1) / W)), e0(index % ((s.E + W - 1) / W) * W) {
    lanes = std::min(W, s.E - e0);
    At.assign(s.N, vf{});
    h.assign(s.N, vf{});
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t w = 0; w < lanes; ++w) {
        At[n][w] = s.A[(e0 + w) * s.N + n];
        h[n][w] = s.h0[(bi * s.E + e0 + w) * s.N + n];
      }
  }

  vf load(const float* x, const Scan& s, int64_t t) const {  // x (b, L, E) at token t, this item's lanes
    const float* p = x + (bi * s.L + t) * s.E + e0;
    vf v = {};
    if (lanes == W) {
      std::memcpy(&v, p, sizeof v);
    } else {
      for (int64_t w = 0; w < lanes; ++w) v[w] = p[w];
    }
    return v;
  }

  void store(vf v, const Scan& s, int64_t t, float* x) const {
    float* p = x + (bi * s.L + t) * s.E + e0;
    if (lanes == W) {
      std::memcpy(p, &v, sizeof v);
    } else {
      for (int64_t w = 0; w < lanes; ++w) p[w] = v[w];
    }
  }

  // One token forward: state <- exp(dt A) state + dt u B; returns C . state.
  vf step(const Scan& s, int64_t t, vf* state) const {
    const vf dtv = load(s.dt, s, t), duv = dtv * load(s.u, s, t);
    const float* Bt = s.B + (bi * s.L + t) * s.N;
    const float* Ct = s.C + (bi * s.L + t) * s.N;
    vf y = {};
    for (int64_t n = 0; n < s.N; ++n) {
      state[n] = exp_lanes(dtv * At[n]) * state[n] + duv * Bt[n];
      y += state[n] * Ct[n];
    }
    return y;
  }
};

// CPUs this process may run on (its affinity mask: a container's share, not the host's count).
static int64_t usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs fn(i) for i in [0, count) on up to usable_cpus() threads. Results must not depend on which
// thread runs an index (each index writes its own outputs), so they do not depend on the CPU count.
template <typename Fn>
static void parallel_for(int64_t count, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, std::min(usable_cpus(), count));
  auto worker = [&](int64_t j) {
    for (int64_t i = j; i < count; i += threads) fn(i);
  };
  std::vector<std::thread> pool;
  for (int64_t j = 1; j < threads; ++j) pool.emplace_back(worker, j);
  worker(0);
  for (auto& th : pool) th.join();
}

// The operands' shapes: u, dt (b, L, E); A (E, N); B, C (b, L, N); h0 (b, E, N); extra buffers (the
// backward pass's dy, dh_last) shaped like u and h0. An error names the first that does not fit.
static ffi::Error check_shapes(const Scan& s, ffi::Buffer<ffi::F32>& u, ffi::Buffer<ffi::F32>& dt,
                               ffi::Buffer<ffi::F32>& A, ffi::Buffer<ffi::F32>& B, ffi::Buffer<ffi::F32>& C,
                               ffi::Buffer<ffi::F32>& h0) {
  auto is = [](auto dims, std::vector<int64_t> want) {
    return dims.size() == want.size() && std::equal(want.begin(), want.end(), dims.begin());
  };
  if (u.dimensions().size() != 3 || A.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("cfm_selective_scan: u must be (b, L, E) and A (E, N)");
  if (!is(dt.dimensions(), {s.b, s.L, s.E}) || !is(A.dimensions(), {s.E, s.N}) ||
      !is(B.dimensions(), {s.b, s.L, s.N}) || !is(C.dimensions(), {s.b, s.L, s.N}) ||
      !is(h0.dimensions(), {s.b, s.E, s.N}))
    return ffi::Error::InvalidArgument("cfm_selective_scan: dt, A, B, C or h0 does not fit u (b, L, E) and A (E, N)");
  return ffi::Error::Success();
}

static Scan scan_of(ffi::Buffer<ffi::F32>& u, ffi::Buffer<ffi::F32>& dt, ffi::Buffer<ffi::F32>& A,
                    ffi::Buffer<ffi::F32>& B, ffi::Buffer<ffi::F32>& C, ffi::Buffer<ffi::F32>& h0) {
  auto d = u.dimensions();
  auto a = A.dimensions();
  return Scan{d.size() > 0 ? d[0] : 0, d.size() > 1 ? d[1] : 0, d.size() > 2 ? d[2] : 0, a.size() > 1 ? a[1] : 0,
              u.typed_data(), dt.typed_data(), A.typed_data(), B.typed_data(), C.typed_data(), h0.typed_data()};
}

static ffi::Error Forward(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> dt, ffi::Buffer<ffi::F32> A,
                          ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C, ffi::Buffer<ffi::F32> h0,
                          ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h_last) {
  const Scan s = scan_of(u, dt, A, B, C, h0);
  if (auto e = check_shapes(s, u, dt, A, B, C, h0); e.failure()) return e;
  const int64_t items = s.b * ((s.E + W - 1) / W);
  parallel_for(items, [&](int64_t index) {
    Item it(s, index);
    for (int64_t t = 0; t < s.L; ++t) it.store(it.step(s, t, it.h.data()), s, t, y->typed_data());
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t w = 0; w < it.lanes; ++w) h_last->typed_data()[(it.bi * s.E + it.e0 + w) * s.N + n] = it.h[n][w];
  });
  return ffi::Error::Success();
}

static ffi::Error Backward(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> dt, ffi::Buffer<ffi::F32> A,
                           ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> dh_last, ffi::ResultBuffer<ffi::F32> du,
                           ffi::ResultBuffer<ffi::F32> ddt, ffi::ResultBuffer<ffi::F32> dA,
                           ffi::ResultBuffer<ffi::F32> dB, ffi::ResultBuffer<ffi::F32> dC,
                           ffi::ResultBuffer<ffi::F32> dh0) {
  const Scan s = scan_of(u, dt, A, B, C, h0);
  if (auto e = check_shapes(s, u, dt, A, B, C, h0); e.failure()) return e;
  if (dy.dimensions().size() != 3 || !std::equal(u.dimensions().begin(), u.dimensions().end(), dy.dimensions().begin()) ||
      dh_last.element_count() != h0.element_count())
    return ffi::Error::InvalidArgument("cfm_selective_scan: dy must be shaped as u and dh_last as h0");
  const int64_t blocks = (s.E + W - 1) / W, N = s.N;
  const int64_t chunks = (s.L + kChunk - 1) / kChunk;
  // Work units: kGroups fixed sets of channel blocks (unit g: blocks g, g + groups, ...), each for all
  // sequences in order. dA sums over sequences inside a unit; dB and dC sum over channels into one
  // partial sum per unit, added up in unit order at the end: the same bits whatever the CPU count.
  const int64_t groups = std::min<int64_t>(kGroups, blocks);
  std::fill(dA->typed_data(), dA->typed_data() + s.E * N, 0.0f);
  std::vector<std::vector<float>> pB(groups, std::vector<float>(s.b * s.L * N, 0.0f));
  std::vector<std::vector<float>> pC(groups, std::vector<float>(s.b * s.L * N, 0.0f));
  // One (sequence, channel block) item: dB and dC partial sums into pBj, pCj.
  auto backward_item = [&](int64_t index, float* pBj, float* pCj) {
    Item it(s, index);
    std::vector<vf> starts(chunks * N), states(kChunk * N), g(N, vf{}), dAi(N, vf{});
    for (int64_t t = 0; t < s.L; ++t) {  // forward again, keeping the state before each chunk
      if (t % kChunk == 0) std::copy(it.h.begin(), it.h.end(), starts.begin() + t / kChunk * N);
      it.step(s, t, it.h.data());
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t w = 0; w < it.lanes; ++w) g[n][w] = dh_last.typed_data()[(it.bi * s.E + it.e0 + w) * N + n];
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * kChunk, t1 = std::min(s.L, t0 + kChunk);
      for (int64_t t = t0; t < t1; ++t) {  // states[(t - t0) N ..] = h_t
        const vf* prev = t > t0 ? &states[(t - t0 - 1) * N] : &starts[c * N];
        std::copy(prev, prev + N, states.begin() + (t - t0) * N);
        it.step(s, t, &states[(t - t0) * N]);
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const vf dtv = it.load(s.dt, s, t), uv = it.load(s.u, s, t), dyv = it.load(dy.typed_data(), s, t);
        const vf duv = dtv * uv;
        const float* Bt = s.B + (it.bi * s.L + t) * N;
        const float* Ct = s.C + (it.bi * s.L + t) * N;
        float* dBt = pBj + (it.bi * s.L + t) * N;
        float* dCt = pCj + (it.bi * s.L + t) * N;
        const vf* h_t = &states[(t - t0) * N];
        const vf* h_prev = t > t0 ? h_t - N : &starts[c * N];
        vf d_dtu = {}, d_decay = {};
        for (int64_t n = 0; n < N; ++n) {
          const vf gt = g[n] + dyv * Ct[n];  // dL/dh_t: through y_t and from later tokens
          dCt[n] += lane_sum(h_t[n] * dyv);
          dBt[n] += lane_sum(gt * duv);
          d_dtu += gt * Bt[n];
          const vf a = exp_lanes(dtv * it.At[n]);
          const vf gd = gt * h_prev[n] * a;  // dL/d(dt A)
          d_decay += gd * it.At[n];
          dAi[n] += gd * dtv;
          g[n] = a * gt;  // what flows into h_{t-1}
        }
        it.store(d_dtu * dtv, s, t, du->typed_data());
        it.store(d_dtu * uv + d_decay, s, t, ddt->typed_data());
      }
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t w = 0; w < it.lanes; ++w) {
        dh0->typed_data()[(it.bi * s.E + it.e0 + w) * N + n] = g[n][w];
        dA->typed_data()[(it.e0 + w) * N + n] += dAi[n][w];
      }
  };
  parallel_for(groups, [&](int64_t j) {
    for (int64_t bi = 0; bi < s.b; ++bi)
      for (int64_t block = j; block < blocks; block += groups) backward_item(bi * blocks + block, pB[j].data(), pC[j].data());
  });
  const std::vector<std::pair<std::vector<std::vector<float>>*, float*>> sums = {
      {&pB, dB->typed_data()}, {&pC, dC->typed_data()}};
  for (auto [parts, out] : sums) {
    for (int64_t i = 0; i < s.b * s.L * N; ++i) {
      float total = 0.0f;
      for (const auto& part : *parts) total += part[i];
      out[i] = total;
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmSelectiveScanForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CfmSelectiveScanBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
