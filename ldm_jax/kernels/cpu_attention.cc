// Fused scaled dot-product attention for XLA:CPU (forward and backward), as XLA FFI handlers.
//
// Why: on CPU, XLA runs attention as separate batched matmuls with passes over a materialised
// [Lq, Lk] score matrix between them (softmax, its backward), each pass a trip through memory.
// Here every (batch x head, block of queries) keeps its score rows in cache from the matmul
// through the softmax to the next matmul, the flash-attention recurrence of
// ldm_jax/models/chunked_attention.py (same residuals: q, k, v, output, log-sum-exp).
//
// Layout: q [..., Lq, d], k [..., Lk, d], v [..., Lk, dv], float32, row-major; the leading
// dimensions are flattened into G independent (batch x head) groups. Work is spread over
// XLA's intra-op thread pool; the calling thread takes part, so the call never waits on a
// pool that is busy elsewhere.
//
// The GEMM microkernels use GCC/Clang vector extensions (16 floats): with -march=native they
// compile to AVX-512 where the CPU has it and to pairs of AVX2 registers elsewhere.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "microkernels.h"

namespace ffi = xla::ffi;

namespace {
using namespace ldm_jax;

// dst [rows, ld] <- src [rows, cols] * scale (src rows `stride` apart), zero-padded to ld
// columns (and to pad_rows rows).
void pack_rows(const float* src, int rows, int cols, int64_t stride, float scale, float* dst,
               int ld, int pad_rows) {
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) dst[r * ld + c] = src[r * stride + c] * scale;
    for (int c = cols; c < ld; ++c) dst[r * ld + c] = 0.0f;
  }
  std::memset(dst + static_cast<size_t>(rows) * ld, 0,
              sizeof(float) * static_cast<size_t>(pad_rows - rows) * ld);
}

// dst [cols, ld] <- src [rows, cols]^T (src rows `stride` apart), zero-padded to ld columns
// (ld >= rows).
void pack_transposed(const float* src, int rows, int cols, int64_t stride, float* dst, int ld) {
  for (int c = 0; c < cols; ++c) {
    float* out = dst + static_cast<size_t>(c) * ld;
    for (int r = 0; r < rows; ++r) out[r] = src[r * stride + c];
    for (int r = rows; r < ld; ++r) out[r] = 0.0f;
  }
}

// Operands are [batch, L, heads, width] (the model's layout, so no transposes around the
// call), or q, k and v packed in one [batch, L, heads, 3 * d] projection; group g is
// (batch g / heads, head g % heads).
struct Shape {
  int64_t groups;
  int heads, lq, lk, d, dv;
  // Padded sizes: feature widths to whole vectors, keys to whole 32-wide tiles.
  int dp, dvp, lkp;
  int block;  // queries per block: the block's score rows stay in cache.
};

Shape make_shape(int64_t groups, int heads, int lq, int lk, int d, int dv) {
  Shape s{groups, heads, lq, lk, d, dv, round_up(d, kLanes), round_up(dv, kLanes),
          round_up(lk, 2 * kLanes), 0};
  // About 256 KB of scores per block (two such buffers in the backward pass fit in L2).
  s.block = std::max(8, std::min(64, (65536 / s.lkp) / 8 * 8));
  return s;
}

// Scores of one block of queries: S [rows, lkp] = Qs [rows, dp] @ Kt [dp, lkp], then
// P = exp(S - m) with m the row max (forward) or the given log-sum-exp (backward); padded key
// columns get probability 0. Returns nothing; row sums land in `sums` when given.
void block_probabilities(const Shape& s, const float* qs, int rows, const float* kt, float* p,
                         const float* lse, float* maxes, float* sums) {
  gemm_ab<false>(qs, s.dp, kt, s.lkp, rows, s.lkp, s.dp, p, s.lkp);
  for (int r = 0; r < rows; ++r) {
    float* row = p + static_cast<size_t>(r) * s.lkp;
    float m;
    if (lse) {
      m = lse[r];
    } else {
      int c = 0;
      vf vmax = splat(-INFINITY);
      for (; c + kLanes <= s.lk; c += kLanes) {
        vf x = load(row + c);
        vmax = x > vmax ? x : vmax;
      }
      m = -INFINITY;
      for (int j = 0; j < kLanes; ++j) m = std::max(m, vmax[j]);
      for (; c < s.lk; ++c) m = std::max(m, row[c]);
      maxes[r] = m;
    }
    const vf vm = splat(m);
    for (int c = 0; c < s.lkp; c += kLanes) store(row + c, vexp(load(row + c) - vm));
    for (int c = s.lk; c < s.lkp; ++c) row[c] = 0.0f;
    if (sums) {
      vf total{};
      for (int c = 0; c < s.lkp; c += kLanes) total += load(row + c);
      float sum = 0.0f;
      for (int j = 0; j < kLanes; ++j) sum += total[j];
      sums[r] = sum;
    }
  }
}

// Where an operand's rows are: row r of group g (batch g / heads, head g % heads) starts at
// base + (g / heads) * batch + (g % heads) * head + r * stride. A [batch, L, heads, width]
// array is (L * heads * width, width, heads * width); q, k or v inside a packed
// [batch, L, heads, 3 * d] projection is the same with 3 * d and an offset of 0, d or 2 d.
template <typename T>
struct View {
  T* base;
  int64_t batch, head, stride;
  T* row(int64_t g, int heads, int64_t r) const {
    return base + (g / heads) * batch + (g % heads) * head + r * stride;
  }
  operator View<const T>() const { return {base, batch, head, stride}; }
};

template <typename T>
View<T> dense_view(T* base, int len, int heads, int width) {
  return View<T>{base, static_cast<int64_t>(len) * heads * width, width,
                 static_cast<int64_t>(heads) * width};
}

template <typename T>
View<T> packed_view(T* base, int part, int len, int heads, int d) {
  return View<T>{base + part * d, static_cast<int64_t>(len) * heads * 3 * d, 3 * d,
                 static_cast<int64_t>(heads) * 3 * d};
}

ffi::Error check_dense(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                       const ffi::AnyBuffer& v, Shape* shape) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (q.element_type() != ffi::F32 || k.element_type() != ffi::F32 ||
      v.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("ldm_attention: q, k, v must be float32");
  if (qd.size() < 3 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument(
        "ldm_attention: q, k, v must be [..., L, heads, width] of the same rank");
  int64_t groups = 1;
  for (size_t i = 0; i < qd.size(); ++i) {
    if (i == qd.size() - 3 || i == qd.size() - 1) continue;
    if (kd[i] != qd[i] || vd[i] != qd[i])
      return ffi::Error::InvalidArgument("ldm_attention: leading dimensions differ");
    groups *= qd[i];
  }
  size_t n = qd.size();
  if (kd[n - 1] != qd[n - 1] || vd[n - 3] != kd[n - 3])
    return ffi::Error::InvalidArgument("ldm_attention: q/k width or k/v length mismatch");
  *shape = make_shape(groups, static_cast<int>(qd[n - 2]), static_cast<int>(qd[n - 3]),
                      static_cast<int>(kd[n - 3]), static_cast<int>(qd[n - 1]),
                      static_cast<int>(vd[n - 1]));
  return ffi::Error::Success();
}

ffi::Error check_packed(const ffi::AnyBuffer& qkv, Shape* shape) {
  auto d = qkv.dimensions();
  if (qkv.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("ldm_attention: qkv must be float32");
  if (d.size() < 3 || d[d.size() - 1] % 3 != 0)
    return ffi::Error::InvalidArgument("ldm_attention: qkv must be [..., L, heads, 3 * d]");
  int64_t groups = 1;
  for (size_t i = 0; i + 3 < d.size(); ++i) groups *= d[i];
  const size_t n = d.size();
  groups *= d[n - 2];
  const int len = static_cast<int>(d[n - 3]), width = static_cast<int>(d[n - 1] / 3);
  *shape = make_shape(groups, static_cast<int>(d[n - 2]), len, len, width, width);
  return ffi::Error::Success();
}

// out (and lse [groups, lq]) <- softmax(scale q k^T) v.
void forward(ffi::ThreadPool& pool, const Shape& s, View<const float> q, View<const float> k,
             View<const float> v, float scale, View<float> out, float* lse) {
  const int blocks = (s.lq + s.block - 1) / s.block;
  parallel_ranges(pool, s.groups * blocks, [&](int64_t begin, int64_t end) {
    AlignedFloats kt(static_cast<size_t>(s.dp) * s.lkp),
        vpad(static_cast<size_t>(s.lkp) * s.dvp), qs(static_cast<size_t>(s.block) * s.dp),
        p(static_cast<size_t>(s.block) * s.lkp), o(static_cast<size_t>(s.block) * s.dvp),
        maxes(s.block), sums(s.block);
    int64_t packed_group = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / blocks;
      const int q0 = static_cast<int>(item % blocks) * s.block;
      const int rows = std::min(s.block, s.lq - q0);
      if (packed_group != g) {  // keys and values packed once per group and thread
        pack_transposed(k.row(g, s.heads, 0), s.lk, s.d, k.stride, kt.data(), s.lkp);
        pack_rows(v.row(g, s.heads, 0), s.lk, s.dv, v.stride, 1.0f, vpad.data(), s.dvp, s.lkp);
        packed_group = g;
      }
      pack_rows(q.row(g, s.heads, q0), rows, s.d, q.stride, scale, qs.data(), s.dp, rows);
      block_probabilities(s, qs.data(), rows, kt.data(), p.data(), nullptr, maxes.data(),
                          sums.data());
      gemm_ab<false>(p.data(), s.lkp, vpad.data(), s.dvp, rows, s.dvp, s.lkp, o.data(), s.dvp);
      for (int r = 0; r < rows; ++r) {
        const float inv = 1.0f / sums[r];
        float* dst = out.row(g, s.heads, q0 + r);
        for (int c = 0; c < s.dv; ++c) dst[c] = o[static_cast<size_t>(r) * s.dvp + c] * inv;
        lse[g * s.lq + q0 + r] = maxes[r] + std::log(sums[r]);
      }
    }
  });
}

// dq, dk, dv <- the gradients of sum(out * dout), recomputing the probabilities from lse.
void backward(ffi::ThreadPool& pool, const Shape& s, View<const float> q, View<const float> k,
              View<const float> v, View<const float> o, const float* lse,
              View<const float> dout, float scale, View<float> dq, View<float> dk,
              View<float> dv) {
  const int blocks = (s.lq + s.block - 1) / s.block;
  // With fewer groups than threads, each group's queries are split into parts whose key and
  // value gradients are summed at the end.
  const int64_t threads = worker_threads(pool);
  const int parts = static_cast<int>(
      std::min<int64_t>(blocks, std::max<int64_t>(1, threads / std::max<int64_t>(1, s.groups))));
  const size_t kv_size = static_cast<size_t>(s.lkp) * std::max(s.dp, s.dvp);
  AlignedFloats partial_dk(static_cast<size_t>(s.groups) * parts * kv_size);
  AlignedFloats partial_dv(static_cast<size_t>(s.groups) * parts * kv_size);
  parallel_ranges(pool, s.groups * parts, [&](int64_t begin, int64_t end) {
    AlignedFloats kt(static_cast<size_t>(s.dp) * s.lkp),
        kpad(static_cast<size_t>(s.lkp) * s.dp), vt(static_cast<size_t>(s.dvp) * s.lkp),
        qs(static_cast<size_t>(s.block) * s.dp), dos(static_cast<size_t>(s.block) * s.dvp),
        p(static_cast<size_t>(s.block) * s.lkp), dp(static_cast<size_t>(s.block) * s.lkp),
        dqb(static_cast<size_t>(s.block) * s.dp), rowdot(s.block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / parts;
      const int part = static_cast<int>(item % parts);
      const int b_begin = blocks * part / parts, b_end = blocks * (part + 1) / parts;
      pack_transposed(k.row(g, s.heads, 0), s.lk, s.d, k.stride, kt.data(), s.lkp);
      pack_rows(k.row(g, s.heads, 0), s.lk, s.d, k.stride, 1.0f, kpad.data(), s.dp, s.lkp);
      pack_transposed(v.row(g, s.heads, 0), s.lk, s.dv, v.stride, vt.data(), s.lkp);
      float* gdk = partial_dk.data() + static_cast<size_t>(item) * kv_size;
      float* gdv = partial_dv.data() + static_cast<size_t>(item) * kv_size;
      std::fill(gdk, gdk + kv_size, 0.0f);
      std::fill(gdv, gdv + kv_size, 0.0f);
      for (int b = b_begin; b < b_end; ++b) {
        const int q0 = b * s.block;
        const int rows = std::min(s.block, s.lq - q0);
        pack_rows(q.row(g, s.heads, q0), rows, s.d, q.stride, scale, qs.data(), s.dp, rows);
        pack_rows(dout.row(g, s.heads, q0), rows, s.dv, dout.stride, 1.0f, dos.data(), s.dvp,
                  rows);
        for (int r = 0; r < rows; ++r) {  // rowsum(dO * O): the softmax backward's correction
          float acc = 0.0f;
          const float* dorow = dout.row(g, s.heads, q0 + r);
          const float* orow = o.row(g, s.heads, q0 + r);
          for (int c = 0; c < s.dv; ++c) acc += dorow[c] * orow[c];
          rowdot[r] = acc;
        }
        block_probabilities(s, qs.data(), rows, kt.data(), p.data(), lse + g * s.lq + q0,
                            nullptr, nullptr);
        // dV += P^T dO
        gemm_atb(p.data(), s.lkp, dos.data(), s.dvp, rows, s.lkp, s.dvp, gdv, s.dvp);
        // dP = dO V^T; dS = P * (dP - rowdot), in place in dp
        gemm_ab<false>(dos.data(), s.dvp, vt.data(), s.lkp, rows, s.lkp, s.dvp, dp.data(),
                       s.lkp);
        for (int r = 0; r < rows; ++r) {
          float* dprow = dp.data() + static_cast<size_t>(r) * s.lkp;
          const float* prow = p.data() + static_cast<size_t>(r) * s.lkp;
          const vf rd = splat(rowdot[r]);
          for (int c = 0; c < s.lkp; c += kLanes)
            store(dprow + c, load(prow + c) * (load(dprow + c) - rd));
        }
        // dK += dS^T (scale Q) ; dQ = scale dS K
        gemm_atb(dp.data(), s.lkp, qs.data(), s.dp, rows, s.lkp, s.dp, gdk, s.dp);
        gemm_ab<false>(dp.data(), s.lkp, kpad.data(), s.dp, rows, s.dp, s.lkp, dqb.data(), s.dp);
        for (int r = 0; r < rows; ++r) {
          float* dst = dq.row(g, s.heads, q0 + r);
          for (int c = 0; c < s.d; ++c) dst[c] = dqb[static_cast<size_t>(r) * s.dp + c] * scale;
        }
      }
    }
  });
  parallel_ranges(pool, s.groups, [&](int64_t g_begin, int64_t g_end) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      for (int part = 0; part < parts; ++part) {
        const float* gdk = partial_dk.data() + static_cast<size_t>(g * parts + part) * kv_size;
        const float* gdv = partial_dv.data() + static_cast<size_t>(g * parts + part) * kv_size;
        for (int r = 0; r < s.lk; ++r) {
          float* dkrow = dk.row(g, s.heads, r);
          float* dvrow = dv.row(g, s.heads, r);
          for (int c = 0; c < s.d; ++c)
            dkrow[c] = (part ? dkrow[c] : 0.0f) + gdk[static_cast<size_t>(r) * s.dp + c];
          for (int c = 0; c < s.dv; ++c)
            dvrow[c] = (part ? dvrow[c] : 0.0f) + gdv[static_cast<size_t>(r) * s.dvp + c];
        }
      }
    }
  });
}

template <typename T>
View<T> dense(T* base, const Shape& s, bool keys, bool values) {
  return dense_view(base, keys ? s.lk : s.lq, s.heads, values ? s.dv : s.d);
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                            ffi::AnyBuffer v, float scale, ffi::Result<ffi::AnyBuffer> out,
                            ffi::Result<ffi::AnyBuffer> lse) {
  Shape s;
  if (ffi::Error e = check_dense(q, k, v, &s); e.failure()) return e;
  forward(pool, s, dense(q.typed_data<float>(), s, false, false),
          dense(k.typed_data<float>(), s, true, false), dense(v.typed_data<float>(), s, true, true),
          scale, dense(out->typed_data<float>(), s, false, true), lse->typed_data<float>());
  return ffi::Error::Success();
}

ffi::Error AttentionForwardPacked(ffi::ThreadPool pool, ffi::AnyBuffer qkv, float scale,
                                  ffi::Result<ffi::AnyBuffer> out,
                                  ffi::Result<ffi::AnyBuffer> lse) {
  Shape s;
  if (ffi::Error e = check_packed(qkv, &s); e.failure()) return e;
  const float* base = qkv.typed_data<float>();
  forward(pool, s, packed_view(base, 0, s.lq, s.heads, s.d),
          packed_view(base, 1, s.lq, s.heads, s.d), packed_view(base, 2, s.lq, s.heads, s.d),
          scale, dense(out->typed_data<float>(), s, false, true), lse->typed_data<float>());
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                             ffi::AnyBuffer v, ffi::AnyBuffer o, ffi::AnyBuffer lse,
                             ffi::AnyBuffer dout, float scale, ffi::Result<ffi::AnyBuffer> dq,
                             ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv) {
  Shape s;
  if (ffi::Error e = check_dense(q, k, v, &s); e.failure()) return e;
  backward(pool, s, dense(q.typed_data<float>(), s, false, false),
           dense(k.typed_data<float>(), s, true, false),
           dense(v.typed_data<float>(), s, true, true), dense(o.typed_data<float>(), s, false, true),
           lse.typed_data<float>(), dense(dout.typed_data<float>(), s, false, true), scale,
           dense(dq->typed_data<float>(), s, false, false),
           dense(dk->typed_data<float>(), s, true, false),
           dense(dv->typed_data<float>(), s, true, true));
  return ffi::Error::Success();
}

ffi::Error AttentionBackwardPacked(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer o,
                                   ffi::AnyBuffer lse, ffi::AnyBuffer dout, float scale,
                                   ffi::Result<ffi::AnyBuffer> dqkv) {
  Shape s;
  if (ffi::Error e = check_packed(qkv, &s); e.failure()) return e;
  const float* base = qkv.typed_data<float>();
  float* grad = dqkv->typed_data<float>();
  backward(pool, s, packed_view(base, 0, s.lq, s.heads, s.d),
           packed_view(base, 1, s.lq, s.heads, s.d), packed_view(base, 2, s.lq, s.heads, s.d),
           dense(o.typed_data<float>(), s, false, true), lse.typed_data<float>(),
           dense(dout.typed_data<float>(), s, false, true), scale,
           packed_view(grad, 0, s.lq, s.heads, s.d), packed_view(grad, 1, s.lq, s.heads, s.d),
           packed_view(grad, 2, s.lq, s.heads, s.d));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmAttentionForwardPacked, AttentionForwardPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmAttentionBackwardPacked, AttentionBackwardPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>());
