// XLA FFI handlers for Mamba's selective scan on CPU (cfm_jax/kernels/selective_scan.py):
//   h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t,   y_t = C_t . h_t        (per channel e, state n)
// u, dt: (b, L, E); A: (E, N); B, C: (b, L, N); h: (b, E, N); all float32, row-major.
//
// Work is split into (sequence, block of W channels) items over a few threads. Inside an item the
// W channels are the vector lanes, the N states a loop, time the outer loop: the state (N x W) and
// its decays stay in L1 and nothing of size (L, E, N) is ever written to memory. The backward pass
// runs the forward again, keeping the state every kChunk tokens, then walks each chunk backwards
// from its recomputed states.
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// An item's W channels are the vector lanes (cpu_common.h).
constexpr int64_t kChunk = 64;  // tokens between the states the backward pass keeps
constexpr int64_t kGroups = 16; // work units of the backward pass (see Backward)

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
