// Stride-1 2-D convolution (NHWC x HWIO) for XLA:CPU, as XLA FFI handlers: the forward pass
// (also the input gradient, as a convolution of the output gradient with the flipped,
// transposed kernel) and the weight gradient.
//
// Why: XLA:CPU's convolutions (YNNPACK/Eigen) run at about half of oneDNN's speed on the
// UNet's and the autoencoders' 3x3 layers, forward and backward (bench/README.md). Here a
// convolution is an implicit GEMM over one output row at a time: for each kernel tap, the
// row's (horizontally padded) input pixels [Wo, Cin] times the tap's weights [Cin, Cout],
// accumulated in a register-blocked microkernel; the weight gradient is the transposed
// product, input pixels^T [Cin, Wo] times output-gradient pixels [Wo, Cout], per tap.
// Nothing larger than kh input rows is ever copied (no im2col matrix, no padded input).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "microkernels.h"

namespace ffi = xla::ffi;

namespace {
using namespace ldm_jax;

struct ConvShape {
  int64_t n;
  int h, w, cin, cout, kh, kw, pt, pb, pl, pr, ho, wo, wpad, coutp;
};

ffi::Error conv_shape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w_or_dy, bool second_is_dy,
                      int64_t kh, int64_t kw, int64_t cout, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr, ConvShape* s) {
  auto xd = x.dimensions();
  if (x.element_type() != ffi::F32 || w_or_dy.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("ldm_conv: operands must be float32");
  if (xd.size() != 4 || w_or_dy.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("ldm_conv: operands must be rank 4 (NHWC, HWIO)");
  if (pt < 0 || pb < 0 || pl < 0 || pr < 0 || pt >= kh || pb >= kh || pl >= kw || pr >= kw)
    return ffi::Error::InvalidArgument("ldm_conv: padding must be in [0, kernel size)");
  *s = ConvShape{xd[0], static_cast<int>(xd[1]), static_cast<int>(xd[2]),
                 static_cast<int>(xd[3]), static_cast<int>(cout), static_cast<int>(kh),
                 static_cast<int>(kw), static_cast<int>(pt), static_cast<int>(pb),
                 static_cast<int>(pl), static_cast<int>(pr), 0, 0, 0, 0};
  s->ho = s->h + s->pt + s->pb - s->kh + 1;
  s->wo = s->w + s->pl + s->pr - s->kw + 1;
  s->wpad = s->w + s->pl + s->pr;
  s->coutp = round_up(s->cout, kLanes);
  if (s->ho <= 0 || s->wo <= 0)
    return ffi::Error::InvalidArgument("ldm_conv: the kernel is larger than the padded input");
  auto od = w_or_dy.dimensions();
  if (second_is_dy && (od[0] != s->n || od[1] != s->ho || od[2] != s->wo || od[3] != cout))
    return ffi::Error::InvalidArgument("ldm_conv: output gradient shape mismatch");
  if (!second_is_dy && (od[0] != kh || od[1] != kw || od[2] != s->cin || od[3] != cout))
    return ffi::Error::InvalidArgument("ldm_conv: kernel shape mismatch");
  return ffi::Error::Success();
}

// Output rows per work item: enough pixels (about 256) that each weight tile loaded from cache
// serves many of them.
int rows_per_block(const ConvShape& s) { return std::max(1, std::min(s.ho, 256 / s.wo)); }

// buf [rows + kh - 1][wpad][cin] <- the input rows feeding output rows ho0 .. ho0 + rows - 1 of
// image n, zero outside the image (vertical padding) and in the pl / pr border columns.
void gather_rows(const ConvShape& s, const float* x, int64_t n, int ho0, int rows, float* buf) {
  const size_t row_len = static_cast<size_t>(s.wpad) * s.cin;
  for (int i = 0; i < rows + s.kh - 1; ++i) {
    float* dst = buf + i * row_len;
    const int hi = ho0 - s.pt + i;
    if (hi < 0 || hi >= s.h) {
      std::memset(dst, 0, sizeof(float) * row_len);
      continue;
    }
    std::memset(dst, 0, sizeof(float) * s.pl * s.cin);
    std::memcpy(dst + static_cast<size_t>(s.pl) * s.cin,
                x + ((n * s.h + hi) * static_cast<int64_t>(s.w)) * s.cin,
                sizeof(float) * static_cast<size_t>(s.w) * s.cin);
    std::memset(dst + static_cast<size_t>(s.pl + s.w) * s.cin, 0, sizeof(float) * s.pr * s.cin);
  }
}

// C[p][0 .. NV*16) = sum over taps t and channels k of A[p][offs[t] + k] * B[t * cin + k][.]
// for P pixels p (rows of A `cin` apart): every tap accumulates in registers.
template <int P, int NV>
inline void micro_conv(const float* a, const int64_t* offs, int taps, int cin, const float* b,
                       float* c, int ldc, bool accumulate) {
  vf acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) acc[p][j] = accumulate ? load(c + p * ldc + j * kLanes) : vf{};
  for (int t = 0; t < taps; ++t) {
    const float* at = a + offs[t];
    for (int k = 0; k < cin; ++k, b += NV * kLanes) {
      vf bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = load(b + j * kLanes);
      for (int p = 0; p < P; ++p) {
        vf av = splat(at[p * cin + k]);
        for (int j = 0; j < NV; ++j) acc[p][j] += av * bv[j];
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) store(c + p * ldc + j * kLanes, acc[p][j]);
}

// C[ci][0 .. NV*16) += sum over the block's pixels of A[pixel][ci] * G[pixel][.] for 8 input
// channels, one tap. A is one 8-channel plane of the gathered rows, [rows + kh - 1][wpad][8]
// (pixel (r, w) of the tap at (r * wpad + w) * 8 + off), G one column tile of the output
// gradient, [rows * wo][NV * 16]: both are read front to back.
template <int NV>
inline void micro_wgrad(const float* a, int64_t off, int wpad, int rows, int wo, const float* g,
                        float* c, int ldc) {
  constexpr int CI = 8;
  vf acc[CI][NV];
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = load(c + i * ldc + j * kLanes);
  for (int r = 0; r < rows; ++r) {
    const float* ar = a + static_cast<int64_t>(r) * wpad * CI + off;
    for (int w = 0; w < wo; ++w, g += NV * kLanes) {
      vf gv[NV];
      for (int j = 0; j < NV; ++j) gv[j] = load(g + j * kLanes);
      for (int i = 0; i < CI; ++i) {
        vf av = splat(ar[w * CI + i]);
        for (int j = 0; j < NV; ++j) acc[i][j] += av * gv[j];
      }
    }
  }
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < NV; ++j) store(c + i * ldc + j * kLanes, acc[i][j]);
}

// Column tiles of the (padded) output channels: `widest` vectors wide while they fit, then 2
// and 1 (coutp is a whole number of vectors).
template <typename Fn>
void for_column_tiles(int coutp, int widest, Fn fn) {
  int c = 0;
  for (int nv = widest; nv >= 1; nv /= 2)
    for (; c + nv * kLanes <= coutp; c += nv * kLanes) fn(c, nv);
}

// One output row's pixels for one column tile, P pixels per microkernel call.
template <int P, int NV>
void conv_row(const float* a, const int64_t* offs, int taps, int cin, const float* b, float* c,
              int ldc, int wo, bool accumulate) {
  int p = 0;
  for (; p + P <= wo; p += P)
    micro_conv<P, NV>(a + p * cin, offs, taps, cin, b, c + p * ldc, ldc, accumulate);
  for (; p < wo; ++p)
    micro_conv<1, NV>(a + p * cin, offs, taps, cin, b, c + p * ldc, ldc, accumulate);
}

// Taps per pass over a block's pixels: the pass's weights (taps * cin * tile width floats)
// stay within about 32 KB, so they are read from L1 by every pixel group of the block (the
// partial sums go through the output buffer between passes).
int taps_per_pass(int taps, int cin, int width) {
  return std::max(1, std::min(taps, 8192 / std::max(1, cin * width)));
}

// Forward tiles: 32 output channels x 8 pixels (16 accumulators), then 16 x 8. (64 x 4 and
// 64 x 6 were tried: no faster on the UNet's layers.)
constexpr int kForwardWidest = 2;

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr, ffi::Result<ffi::AnyBuffer> y) {
  auto wd = w.dimensions();
  ConvShape s;
  if (ffi::Error e = conv_shape(x, w, false, wd[0], wd[1], wd[3], pt, pb, pl, pr, &s);
      e.failure())
    return e;
  const float* xp = x.typed_data<float>();
  const float* wp = w.typed_data<float>();
  float* yp = y->typed_data<float>();
  const int taps = s.kh * s.kw;
  const int64_t depth = static_cast<int64_t>(taps) * s.cin;
  // Weights tile-major: for each column tile, [taps * cin, tile width] contiguous, so the
  // microkernel streams them in order.
  std::vector<float> wpack(depth * s.coutp, 0.0f);
  for_column_tiles(s.coutp, kForwardWidest, [&](int c0, int nv) {
    float* dst = wpack.data() + depth * c0;
    const int width = nv * kLanes, valid = std::max(0, std::min(width, s.cout - c0));
    for (int64_t k = 0; k < depth; ++k)
      std::memcpy(dst + k * width, wp + k * s.cout + c0, sizeof(float) * valid);
  });
  std::vector<int64_t> offs(taps);
  for (int i = 0; i < s.kh; ++i)
    for (int j = 0; j < s.kw; ++j) offs[i * s.kw + j] = (static_cast<int64_t>(i) * s.wpad + j) * s.cin;
  const int rows = rows_per_block(s);
  const int blocks = (s.ho + rows - 1) / rows;
  parallel_ranges(pool, s.n * blocks, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(rows + s.kh - 1) * s.wpad * s.cin);
    std::vector<float> out(static_cast<size_t>(rows) * s.wo * s.coutp);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int ho0 = static_cast<int>(item % blocks) * rows;
      const int nrows = std::min(rows, s.ho - ho0);
      gather_rows(s, xp, n, ho0, nrows, buf.data());
      for_column_tiles(s.coutp, kForwardWidest, [&](int c0, int nv) {
        const int width = nv * kLanes, chunk = taps_per_pass(taps, s.cin, width);
        for (int t0 = 0; t0 < taps; t0 += chunk) {
          const int nt = std::min(chunk, taps - t0);
          const float* b = wpack.data() + depth * c0 + static_cast<int64_t>(t0) * s.cin * width;
          for (int r = 0; r < nrows; ++r) {
            const float* a = buf.data() + static_cast<size_t>(r) * s.wpad * s.cin;
            float* c = out.data() + static_cast<size_t>(r) * s.wo * s.coutp + c0;
            if (nv == 2)
              conv_row<8, 2>(a, offs.data() + t0, nt, s.cin, b, c, s.coutp, s.wo, t0 > 0);
            else
              conv_row<8, 1>(a, offs.data() + t0, nt, s.cin, b, c, s.coutp, s.wo, t0 > 0);
          }
        }
      });
      float* dst = yp + (n * s.ho + ho0) * static_cast<int64_t>(s.wo) * s.cout;
      for (int64_t p = 0; p < static_cast<int64_t>(nrows) * s.wo; ++p)
        std::memcpy(dst + p * s.cout, out.data() + p * s.coutp, sizeof(float) * s.cout);
    }
  });
  return ffi::Error::Success();
}

ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                          int64_t kh, int64_t kw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                          ffi::Result<ffi::AnyBuffer> dw) {
  ConvShape s;
  if (ffi::Error e = conv_shape(x, dy, true, kh, kw, dy.dimensions()[3], pt, pb, pl, pr, &s);
      e.failure())
    return e;
  const float* xp = x.typed_data<float>();
  const float* dyp = dy.typed_data<float>();
  const int taps = s.kh * s.kw;
  const int groups = (s.cin + 7) / 8, cinp = groups * 8;  // input channels in planes of 8
  const size_t tap_size = static_cast<size_t>(cinp) * s.coutp;
  std::vector<float> total(taps * tap_size, 0.0f);
  std::mutex total_mutex;
  const int rows = rows_per_block(s);
  const int blocks = (s.ho + rows - 1) / rows;
  const size_t plane = static_cast<size_t>(rows + s.kh - 1) * s.wpad * 8;
  parallel_ranges(pool, s.n * blocks, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(rows + s.kh - 1) * s.wpad * s.cin);
    std::vector<float> planes(groups * plane, 0.0f);
    std::vector<float> grad(static_cast<size_t>(rows) * s.wo * s.coutp, 0.0f);
    std::vector<float> partial(taps * tap_size, 0.0f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks;
      const int ho0 = static_cast<int>(item % blocks) * rows;
      const int nrows = std::min(rows, s.ho - ho0);
      const int in_rows = nrows + s.kh - 1;
      gather_rows(s, xp, n, ho0, nrows, buf.data());
      // [pixel][cin] -> [cin / 8][pixel][8] (zero channels pad the last plane).
      for (int gi = 0; gi < groups; ++gi) {
        float* dst = planes.data() + gi * plane;
        const int width = std::min(8, s.cin - gi * 8);
        for (int64_t px = 0; px < static_cast<int64_t>(in_rows) * s.wpad; ++px)
          for (int i = 0; i < 8; ++i) dst[px * 8 + i] = i < width ? buf[px * s.cin + gi * 8 + i] : 0.0f;
      }
      // The block's output gradient, one contiguous [pixels][tile width] panel per column tile.
      const int64_t pixels = static_cast<int64_t>(nrows) * s.wo;
      const float* g = dyp + (n * s.ho + ho0) * static_cast<int64_t>(s.wo) * s.cout;
      for_column_tiles(s.coutp, 2, [&](int c0, int nv) {
        float* panel = grad.data() + pixels * c0;
        const int width = nv * kLanes, valid = std::max(0, std::min(width, s.cout - c0));
        for (int64_t px = 0; px < pixels; ++px) {
          std::memcpy(panel + px * width, g + px * s.cout + c0, sizeof(float) * valid);
          std::memset(panel + px * width + valid, 0, sizeof(float) * (width - valid));
        }
      });
      for (int i = 0; i < s.kh; ++i) {
        for (int j = 0; j < s.kw; ++j) {
          const int64_t off = (static_cast<int64_t>(i) * s.wpad + j) * 8;
          float* c_tap = partial.data() + (i * s.kw + j) * tap_size;
          for_column_tiles(s.coutp, 2, [&](int c0, int nv) {
            const float* panel = grad.data() + pixels * c0;
            for (int gi = 0; gi < groups; ++gi) {
              float* c = c_tap + static_cast<size_t>(gi) * 8 * s.coutp + c0;
              const float* a = planes.data() + gi * plane;
              if (nv == 2)
                micro_wgrad<2>(a, off, s.wpad, nrows, s.wo, panel, c, s.coutp);
              else
                micro_wgrad<1>(a, off, s.wpad, nrows, s.wo, panel, c, s.coutp);
            }
          });
        }
      }
    }
    std::lock_guard<std::mutex> lock(total_mutex);
    for (size_t i = 0; i < total.size(); ++i) total[i] += partial[i];
  });
  float* out = dw->typed_data<float>();
  for (int t = 0; t < taps; ++t)
    for (int ci = 0; ci < s.cin; ++ci)
      std::memcpy(out + (static_cast<int64_t>(t) * s.cin + ci) * s.cout,
                  total.data() + t * tap_size + static_cast<size_t>(ci) * s.coutp,
                  sizeof(float) * s.cout);
  return ffi::Error::Success();
}

// out[kh-1-i][kw-1-j][o][c] = w[i][j][c][o]: the kernel of the input gradient (the forward
// kernel flipped, input and output channels swapped), for this file's forward pass and for
// XLA's convolution alike. XLA:CPU's own reverse + transpose of these weights ran at about
// 2.4 GB/s in a UNet step (16 ms for a 3x3x1024x512 kernel; 131 ms of a width-128 UNet step
// went to them).
ffi::Error FlipTranspose(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out) {
  auto d = w.dimensions();
  if (w.element_type() != ffi::F32 || d.size() != 4)
    return ffi::Error::InvalidArgument("ldm_flip_transpose: a float32 HWIO kernel expected");
  const int64_t kh = d[0], kw = d[1], cin = d[2], cout = d[3];
  const float* src = w.typed_data<float>();
  float* dst = out->typed_data<float>();
  // Tiles of 64 x 64 (16 KB each way, in L1), in 16 x 16 blocks inside.
  constexpr int64_t kTile = 64, kBlock = 16;
  const int64_t row_tiles = (cin + kTile - 1) / kTile, col_tiles = (cout + kTile - 1) / kTile;
  parallel_ranges(pool, kh * kw * row_tiles * col_tiles, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / (row_tiles * col_tiles), tile = item % (row_tiles * col_tiles);
      const int64_t c0 = tile / col_tiles * kTile, o0 = tile % col_tiles * kTile;
      const int64_t c1 = std::min(cin, c0 + kTile), o1 = std::min(cout, o0 + kTile);
      const int64_t i = t / kw, j = t % kw;
      const float* s_tap = src + t * cin * cout;
      float* d_tap = dst + ((kh - 1 - i) * kw + (kw - 1 - j)) * cout * cin;
      for (int64_t ob = o0; ob < o1; ob += kBlock)
        for (int64_t cb = c0; cb < c1; cb += kBlock) {
          const int64_t oe = std::min(o1, ob + kBlock), ce = std::min(c1, cb + kBlock);
          for (int64_t o = ob; o < oe; ++o)
            for (int64_t c = cb; c < ce; ++c) d_tap[o * cin + c] = s_tap[c * cout + o];
        }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmFlipTranspose, FlipTranspose,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmConvForward, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmConvWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("kernel_h")
                                  .Attr<int64_t>("kernel_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Ret<ffi::AnyBuffer>());
