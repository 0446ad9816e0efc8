// Helpers shared by the C++ CPU kernels (selective_scan.cc, flash_attention.cc): W-lane float
// vectors with a vectorizable exp and fixed-order reductions, and a parallel for over the CPUs
// this process may use. Included by the kernels' sources; cfm_jax/kernels/build.py hashes it with them.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

constexpr int64_t W = 16;  // floats per vector (lane_sum assumes 16)

// W floats as one value (GCC/Clang vector extension): AVX-512 registers where the CPU has them,
// split into narrower ones where not.
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

// exp(x) lane-wise, written so the compiler keeps it in vector registers: Cephes' expf (range
// reduction by ln 2 in two parts, degree-6 polynomial), within 1 ulp of expf over [-87.3, 88] (the
// kernels only use x <= 0); 0 below -87.3, where expf turns denormal; e^88
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

// CPUs this process may run on (its affinity mask: a container's share, not the host's count).
static int64_t usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs fn(i) for i in [0, count) on up to usable_cpus() threads, each taking the next index when it
// is free (so units of unequal cost balance). Results must not depend on which thread runs an index
// (each index writes its own outputs), so they do not depend on the CPU count.
template <typename Fn>
static void parallel_for(int64_t count, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, std::min(usable_cpus(), count));
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < count;) fn(i);
  };
  std::vector<std::thread> pool;
  for (int64_t j = 1; j < threads; ++j) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}
