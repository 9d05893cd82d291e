// Shared by ldm_jax's CPU kernels: 16-float vectors (GCC/Clang vector extensions; AVX-512
// registers with -march=native where the CPU has them, pairs of AVX2 registers elsewhere),
// register-blocked GEMM microkernels, a vector exp, and a parallel loop over XLA's intra-op
// thread pool.
#ifndef LDM_JAX_KERNELS_MICROKERNELS_H_
#define LDM_JAX_KERNELS_MICROKERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ldm_jax {
namespace ffi = xla::ffi;

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64), aligned(4)));

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
// Not `vf{} + x`: without -ffast-math that is a real addition of 0 before the broadcast.
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// exp for x <= ~0 (all our arguments): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6
// polynomial (relative error ~2e-7); arguments below -87 flush to 0.
inline vf vexp(vf x) {
  const vf lo = splat(-87.0f);
  vi under = x < lo;
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer.
  vf t = x * splat(1.44269504088896341f) + magic;
  vi n = reinterpret_cast<vi&>(t) - reinterpret_cast<const vi&>(magic);
  vf nf = t - magic;
  vf r = x - nf * splat(0.693145751953125f);
  r = r - nf * splat(1.428606765330187045e-06f);
  vf p = splat(1.0f / 720) * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  vi bits = (n + 127) << 23;
  vf scale = reinterpret_cast<vf&>(bits);
  vf out = p * scale;
  return under ? splat(0.0f) : out;
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// std::vector storage on 64-byte (cache-line) boundaries. A plain std::vector<float> from
// glibc's malloc starts 16 bytes past a boundary, so every 16-float vector load or store of a
// buffer laid out in whole vectors (packed weights, output tiles, gradient panels) straddled two
// cache lines.
template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
using AlignedFloats = std::vector<float, CacheAligned<float>>;

// C[r][c] (=|+=) sum_k A[r][k] * B[k][c] for r < R, c < NV * 16: A rows strided by lda,
// B rows by ldb (B is read a row of NV vectors at a time), C rows by ldc.
template <int R, int NV, bool kAccumulate>
inline void micro_ab(const float* A, int lda, const float* B, int ldb, int K, float* C,
                     int ldc) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = kAccumulate ? load(C + r * ldc + j * kLanes) : vf{};
  for (int k = 0; k < K; ++k) {
    vf b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B + k * ldb + j * kLanes);
    for (int r = 0; r < R; ++r) {
      vf a = splat(A[r * lda + k]);
      for (int j = 0; j < NV; ++j) acc[r][j] += a * b[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(C + r * ldc + j * kLanes, acc[r][j]);
}

// C [M, N] (=|+=) A [M, K] @ B [K, N]; N a multiple of 16, any M.
template <bool kAccumulate>
void gemm_ab(const float* A, int lda, const float* B, int ldb, int M, int N, int K, float* C,
             int ldc) {
  int c = 0;
  for (; c + 2 * kLanes <= N; c += 2 * kLanes) {
    int r = 0;
    for (; r + 8 <= M; r += 8)
      micro_ab<8, 2, kAccumulate>(A + r * lda, lda, B + c, ldb, K, C + r * ldc + c, ldc);
    for (; r < M; ++r)
      micro_ab<1, 2, kAccumulate>(A + r * lda, lda, B + c, ldb, K, C + r * ldc + c, ldc);
  }
  for (; c < N; c += kLanes) {
    int r = 0;
    for (; r + 8 <= M; r += 8)
      micro_ab<8, 1, kAccumulate>(A + r * lda, lda, B + c, ldb, K, C + r * ldc + c, ldc);
    for (; r < M; ++r)
      micro_ab<1, 1, kAccumulate>(A + r * lda, lda, B + c, ldb, K, C + r * ldc + c, ldc);
  }
}

// C [N, P] += A^T @ B for A [M, N] (rows strided by lda), B [M, P]; P a multiple of 16.
template <int R, int NV>
inline void micro_atb(const float* A, int lda, const float* B, int ldb, int M, float* C,
                      int ldc) {
  vf acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = load(C + i * ldc + j * kLanes);
  for (int m = 0; m < M; ++m) {
    vf b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B + m * ldb + j * kLanes);
    for (int i = 0; i < R; ++i) {
      vf a = splat(A[m * lda + i]);
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) store(C + i * ldc + j * kLanes, acc[i][j]);
}

inline void gemm_atb(const float* A, int lda, const float* B, int ldb, int M, int N, int P, float* C,
              int ldc) {
  int c = 0;
  for (; c + 2 * kLanes <= P; c += 2 * kLanes) {
    int i = 0;
    for (; i + 8 <= N; i += 8) micro_atb<8, 2>(A + i, lda, B + c, ldb, M, C + i * ldc + c, ldc);
    for (; i < N; ++i) micro_atb<1, 2>(A + i, lda, B + c, ldb, M, C + i * ldc + c, ldc);
  }
  for (; c < P; c += kLanes) {
    int i = 0;
    for (; i + 8 <= N; i += 8) micro_atb<8, 1>(A + i, lda, B + c, ldb, M, C + i * ldc + c, ldc);
    for (; i < N; ++i) micro_atb<1, 1>(A + i, lda, B + c, ldb, M, C + i * ldc + c, ldc);
  }
}

// Threads to split a kernel over: the pool's size, at most the machine's cores. Not the pool
// plus the calling thread: XLA's intra-op pool already has a thread per core, and one more
// thread than cores made the convolution kernel 25 % slower (its static ranges wait for the
// oversubscribed core).
inline int64_t worker_threads(ffi::ThreadPool& pool) {
  const int64_t cores = std::max<unsigned>(1, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), cores));
}

// Runs fn(begin, end) over contiguous ranges covering [0, count), one range per thread (the
// calling thread and the pool's): consecutive items of a range can share packed operands.
template <typename Fn>
void parallel_ranges(ffi::ThreadPool& pool, int64_t count, Fn fn) {
  int64_t threads = std::min<int64_t>(worker_threads(pool), count);
  if (threads == 1) {
    fn(int64_t{0}, count);
    return;
  }
  struct State {
    std::atomic<int64_t> next_range{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const int64_t ranges = threads;
  auto work = [state, ranges, count, &fn]() {
    for (;;) {
      int64_t r = state->next_range.fetch_add(1);
      if (r >= ranges) return;
      fn(count * r / ranges, count * (r + 1) / ranges);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    // A helper that starts after all ranges are taken returns at once without touching fn.
    pool.Schedule([state, ranges, work]() { work(); });
  }
  work();
  while (state->done.load(std::memory_order_acquire) < ranges) std::this_thread::yield();
}

}  // namespace ldm_jax

#endif  // LDM_JAX_KERNELS_MICROKERNELS_H_
