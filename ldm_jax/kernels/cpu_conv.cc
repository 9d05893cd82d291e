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
#include <memory>
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

// `flipped`: the kernel is given as the forward layer's, [kh, kw, cout, cin] (see ConvForward).
ffi::Error conv_shape(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w_or_dy, bool second_is_dy,
                      int64_t kh, int64_t kw, int64_t cout, int64_t pt, int64_t pb, int64_t pl,
                      int64_t pr, ConvShape* s, bool flipped = false) {
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
  const int64_t w_in = flipped ? cout : s->cin, w_out = flipped ? s->cin : cout;
  if (!second_is_dy && (od[0] != kh || od[1] != kw || od[2] != w_in || od[3] != w_out))
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

// C[p][0 .. NV*16) (=|+=) sum over taps t < nt and channels k < kc of A[p][t][k] * B_t[k][.]
// for P consecutive pixels p of an output row: A[p][t] = a + offs[t] + p * s (the gathered
// input rows as they are, [pixel][cin]), B_t = b + t * b_tap, [k][NV * 16].
// Not inlined, and the pixels addressed as {0, s, 2s, 3s} from two base pointers: inlined into
// the loops around it, the compiler ran out of general registers, kept the eight pixels'
// offsets on the stack and reloaded them every iteration of the inner loop (the forward pass
// went from about 270 to 300 GFLOP/s on 2 cores; 150 to 165 on one).
template <int P, int NV>
__attribute__((noinline)) void micro_conv(const float* a, const int64_t* offs, int64_t s,
                                          const float* b, int64_t b_tap, int nt, int kc,
                                          float* c, int ldc, bool accumulate) {
  static_assert(P <= 8, "two base pointers of four pixels each");
  vf acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) acc[p][j] = accumulate ? load(c + p * ldc + j * kLanes) : vf{};
  const int64_t s3 = 3 * s;
  for (int t = 0; t < nt; ++t, b += b_tap) {
    const float* a0 = a + offs[t];
    const float* a4 = a0 + 4 * s;
    const float* bt = b;
    for (int k = 0; k < kc; ++k, ++a0, ++a4, bt += NV * kLanes) {
      vf bv[NV];
      for (int j = 0; j < NV; ++j) bv[j] = load(bt + j * kLanes);
      for (int p = 0; p < P; ++p) {
        const float* q = p < 4 ? a0 : a4;
        const int m = p % 4;
        vf av = splat(m == 0 ? q[0] : m == 1 ? q[s] : m == 2 ? q[2 * s] : q[s3]);
        for (int j = 0; j < NV; ++j) acc[p][j] += av * bv[j];
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < NV; ++j) store(c + p * ldc + j * kLanes, acc[p][j]);
}

// Forward tiles: 8 pixels x 32 output channels (16 accumulators), then x 16; a row's last
// tile may be narrower. (64 x 4 and 64 x 6 were tried: no faster on the UNet's layers.)
constexpr int kFwdPixels = 8;
constexpr int kForwardWidest = 2;

template <int NV>
void conv_tile(int pixels, const float* a, const int64_t* offs, int64_t s, const float* b,
               int64_t b_tap, int nt, int kc, float* c, int ldc, bool accumulate) {
  switch (pixels) {
#define LDM_CONV_TILE(P) \
    case P: return micro_conv<P, NV>(a, offs, s, b, b_tap, nt, kc, c, ldc, accumulate);
    LDM_CONV_TILE(1) LDM_CONV_TILE(2) LDM_CONV_TILE(3) LDM_CONV_TILE(4) LDM_CONV_TILE(5)
    LDM_CONV_TILE(6) LDM_CONV_TILE(7) LDM_CONV_TILE(8)
#undef LDM_CONV_TILE
  }
}

// Weights per pass over a block's pixels (floats): a pass reads taps x kc channels x tile width
// of them, which stay in L1 (48 KB here) while every pixel tile of the block uses them; the
// partial sums go through the output buffer between passes. Whole taps while one fits, else
// slices of one tap's input channels (before, a 512-channel tap's 64 KB were read from L2).
constexpr int kPassFloats = 8192;

// Blocks of a convolution's output for one thread: `rows` output rows of one image or, for maps
// of at most about 256 pixels, `images` whole images, so that each weight tile loaded from cache
// serves about 256 pixels, as long as every thread gets a block.
struct Blocking {
  int rows, row_blocks;
  int64_t images, blocks;
  Blocking(const ConvShape& s, bool split_channels, int64_t threads) {
    rows = rows_per_block(s);
    row_blocks = (s.ho + rows - 1) / rows;
    images = 1;
    if (row_blocks == 1) {
      images = std::max<int64_t>(1, std::min<int64_t>(s.n, 256 / (s.ho * s.wo)));
      if (!split_channels) images = std::max<int64_t>(1, std::min(images, s.n / threads));
    }
    blocks = row_blocks == 1 ? (s.n + images - 1) / images : s.n * row_blocks;
  }
  // Block b: images n0 .. n0 + nimg - 1, output rows ho0 .. ho0 + nrows - 1 of each.
  void locate(const ConvShape& s, int64_t b, int64_t* n0, int* nimg, int* ho0, int* nrows) const {
    *n0 = row_blocks == 1 ? b * images : b / row_blocks;
    *nimg = row_blocks == 1 ? static_cast<int>(std::min<int64_t>(images, s.n - *n0)) : 1;
    *ho0 = row_blocks == 1 ? 0 : static_cast<int>(b % row_blocks) * rows;
    *nrows = std::min(rows, s.ho - *ho0);
  }
};

// Whether to split a convolution over threads by output-channel tiles (each thread computes its
// own columns of the result for every pixel, reading only its part of the weights) rather than
// by pixel blocks: for small maps. Split by pixels, the forward pass read all the weights once
// per block (9.4 MB for 512 -> 512 channels, per 64 pixels of a 4x8x8 map) and the weight
// gradient summed one copy of dW per thread at the end (the same 9.4 MB per thread for 256
// pixels). By channels when there are at least two tiles per thread and at most
// kChannelSplitPixels output pixels per thread.
constexpr int64_t kChannelSplitPixels = 1024;

// Column tiles of the (padded) output channels, as (first column, vectors): `widest` vectors
// wide while they fit, then 2 and 1 (coutp is a whole number of vectors).
std::vector<std::pair<int, int>> column_tiles(int coutp, int widest) {
  std::vector<std::pair<int, int>> tiles;
  int c = 0;
  for (int nv = widest; nv >= 1; nv /= 2)
    for (; c + nv * kLanes <= coutp; c += nv * kLanes) tiles.emplace_back(c, nv);
  return tiles;
}

bool split_by_channels(const ConvShape& s, size_t col_tiles, int64_t threads) {
  return static_cast<int64_t>(col_tiles) >= 2 * threads &&
         s.n * s.ho * s.wo <= kChannelSplitPixels * threads;
}

// With `flipped` set, w is a forward layer's kernel [kh, kw, C, K] and the convolution runs
// with its flipped, transposed kernel w'[i][j][k][c] = w[kh-1-i][kw-1-j][c][k] (input K
// channels, output C): the input gradient of that layer. The packing below reads w' straight
// from w, where a separate flip_transpose wrote and read all the weights once more (150 ms of a
// width-128 UNet step).
ffi::Error ConvForward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, int64_t pt,
                       int64_t pb, int64_t pl, int64_t pr, int64_t flipped,
                       ffi::Result<ffi::AnyBuffer> y) {
  auto wd = w.dimensions();
  ConvShape s;
  if (ffi::Error e = conv_shape(x, w, false, wd[0], wd[1], flipped ? wd[2] : wd[3], pt, pb, pl,
                                pr, &s, flipped != 0);
      e.failure())
    return e;
  const float* xp = x.typed_data<float>();
  const float* wp = w.typed_data<float>();
  float* yp = y->typed_data<float>();
  const int taps = s.kh * s.kw;
  const int64_t depth = static_cast<int64_t>(taps) * s.cin;
  const auto col_tiles = column_tiles(s.coutp, kForwardWidest);
  // Weights tile-major: for each column tile, [taps * cin, tile width] contiguous, so the
  // microkernel streams them in order (packed in parallel: 9.4 MB of them took 1 ms).
  AlignedFloats wpack(depth * s.coutp);
  parallel_ranges(pool, col_tiles.size(), [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const auto [c0, nv] = col_tiles[ti];
      float* dst = wpack.data() + depth * c0;
      const int width = nv * kLanes, valid = std::max(0, std::min(width, s.cout - c0));
      if (!flipped) {
        for (int64_t k = 0; k < depth; ++k) {
          std::memcpy(dst + k * width, wp + k * s.cout + c0, sizeof(float) * valid);
          std::memset(dst + k * width + valid, 0, sizeof(float) * (width - valid));
        }
        continue;
      }
      // dst[t][k][j] = w[taps-1-t][c0 + j][k]: rows of w read in order, 16 x 16 blocks.
      std::fill(dst, dst + depth * width, 0.0f);
      for (int t = 0; t < taps; ++t) {
        const float* src = wp + static_cast<int64_t>(taps - 1 - t) * s.cout * s.cin;
        float* d = dst + static_cast<int64_t>(t) * s.cin * width;
        for (int kb = 0; kb < s.cin; kb += 16)
          for (int j = 0; j < valid; ++j) {
            const float* row = src + static_cast<int64_t>(c0 + j) * s.cin;
            for (int k = kb; k < std::min(s.cin, kb + 16); ++k) d[k * width + j] = row[k];
          }
      }
    }
  });
  std::vector<int64_t> offs(taps);  // tap (i, j)'s first pixel in the gathered rows
  for (int i = 0; i < s.kh; ++i)
    for (int j = 0; j < s.kw; ++j)
      offs[i * s.kw + j] = (static_cast<int64_t>(i) * s.wpad + j) * s.cin;
  const int64_t threads = worker_threads(pool);
  const bool split_channels = split_by_channels(s, col_tiles.size(), threads);
  const Blocking bl(s, split_channels, threads);
  const int tiles = (s.wo + kFwdPixels - 1) / kFwdPixels;  // pixel tiles per output row
  const size_t image_buf = static_cast<size_t>(bl.rows + s.kh - 1) * s.wpad * s.cin;

  // Blocks [b0, b1) x column tiles [t0, t1) of the output.
  auto work = [&](int64_t b0, int64_t b1, int64_t t0, int64_t t1) {
    AlignedFloats buf(bl.images * image_buf);
    AlignedFloats out(static_cast<size_t>(bl.images) * bl.rows * s.wo * s.coutp);
    for (int64_t block = b0; block < b1; ++block) {
      int64_t n0;
      int nimg, ho0, nrows;
      bl.locate(s, block, &n0, &nimg, &ho0, &nrows);
      for (int im = 0; im < nimg; ++im)
        gather_rows(s, xp, n0 + im, ho0, nrows, buf.data() + im * image_buf);
      const int64_t image_pixels = static_cast<int64_t>(nrows) * s.wo;
      for (int64_t ti = t0; ti < t1; ++ti) {
        const auto [c0, nv] = col_tiles[ti];
        const int width = nv * kLanes;
        const int64_t tap_floats = static_cast<int64_t>(s.cin) * width;
        const int nt_pass = static_cast<int>(
            std::max<int64_t>(1, std::min<int64_t>(taps, kPassFloats / tap_floats)));
        const int kc_pass = nt_pass > 1 ? s.cin
            : std::min(s.cin, std::max(kLanes, kPassFloats / width / kLanes * kLanes));
        for (int tap0 = 0; tap0 < taps; tap0 += nt_pass) {
          const int nt = std::min(nt_pass, taps - tap0);
          for (int k0 = 0; k0 < s.cin; k0 += kc_pass) {
            const int kc = std::min(kc_pass, s.cin - k0);
            const bool accumulate = tap0 > 0 || k0 > 0;
            const float* b = wpack.data() + depth * c0 + (static_cast<int64_t>(tap0) * s.cin + k0) * width;
            for (int im = 0; im < nimg; ++im)
              for (int r = 0; r < nrows; ++r)
                for (int g = 0; g < tiles; ++g) {
                  const int p0 = g * kFwdPixels, pixels = std::min(kFwdPixels, s.wo - p0);
                  const float* a = buf.data() + im * image_buf +
                                   (static_cast<int64_t>(r) * s.wpad + p0) * s.cin + k0;
                  float* c = out.data() + (im * image_pixels + static_cast<int64_t>(r) * s.wo + p0) * s.coutp + c0;
                  if (nv == 2)
                    conv_tile<2>(pixels, a, offs.data() + tap0, s.cin, b, tap_floats, nt, kc, c,
                                 s.coutp, accumulate);
                  else
                    conv_tile<1>(pixels, a, offs.data() + tap0, s.cin, b, tap_floats, nt, kc, c,
                                 s.coutp, accumulate);
                }
          }
        }
      }
      // The block's output rows are contiguous in y; this thread's columns of them.
      const int c_begin = col_tiles[t0].first;
      const int c_end = std::min(s.cout, t1 < static_cast<int64_t>(col_tiles.size())
                                             ? col_tiles[t1].first : s.coutp);
      float* dst = yp + (n0 * s.ho + ho0) * static_cast<int64_t>(s.wo) * s.cout;
      for (int64_t p = 0; p < nimg * image_pixels; ++p)
        std::memcpy(dst + p * s.cout + c_begin, out.data() + p * s.coutp + c_begin,
                    sizeof(float) * (c_end - c_begin));
    }
  };
  if (split_channels)
    parallel_ranges(pool, col_tiles.size(), [&](int64_t t0, int64_t t1) { work(0, bl.blocks, t0, t1); });
  else
    parallel_ranges(pool, bl.blocks, [&](int64_t b0, int64_t b1) { work(b0, b1, 0, col_tiles.size()); });
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
  const auto col_tiles = column_tiles(s.coutp, 2);
  const int64_t threads = worker_threads(pool);
  const bool split_channels = split_by_channels(s, col_tiles.size(), threads);
  const Blocking bl(s, split_channels, threads);
  const int in_rows = bl.rows + s.kh - 1;  // gathered rows per image
  const size_t image_plane = static_cast<size_t>(in_rows) * s.wpad * 8;
  const size_t plane = bl.images * image_plane;

  // Blocks [b0, b1) x column tiles [t0, t1) into `acc` ([taps][cinp][coutp]).
  auto work = [&](int64_t b0, int64_t b1, size_t t0, size_t t1, float* acc) {
    AlignedFloats planes(groups * plane, 0.0f);
    AlignedFloats grad(static_cast<size_t>(bl.images) * bl.rows * s.wo * s.coutp, 0.0f);
    for (int64_t block = b0; block < b1; ++block) {
      int64_t n0;
      int nimg, ho0, nrows;
      bl.locate(s, block, &n0, &nimg, &ho0, &nrows);
      for (int im = 0; im < nimg; ++im) {
        // The input rows feeding the block, [cin / 8][image][pixel][8] (zero outside the image
        // and in the channels padding the last plane), straight from x: one pass of 8-float
        // copies (through a gathered [pixel][cin] copy and a per-element loop this was about a
        // tenth of the kernel's time).
        const int64_t row_px = s.wpad;
        for (int i = 0; i < nrows + s.kh - 1; ++i) {
          const int hi = ho0 - s.pt + i;
          const bool inside = hi >= 0 && hi < s.h;
          const float* src_row = xp + ((n0 + im) * s.h + (inside ? hi : 0)) * static_cast<int64_t>(s.w) * s.cin;
          for (int gi = 0; gi < groups; ++gi) {
            float* dst = planes.data() + gi * plane + im * image_plane + i * row_px * 8;
            const int width = std::min(8, s.cin - gi * 8);
            if (!inside) {
              std::memset(dst, 0, sizeof(float) * row_px * 8);
              continue;
            }
            std::memset(dst, 0, sizeof(float) * s.pl * 8);
            std::memset(dst + (s.pl + s.w) * 8, 0, sizeof(float) * s.pr * 8);
            float* d = dst + s.pl * 8;
            const float* src = src_row + gi * 8;
            if (width == 8) {
              for (int px = 0; px < s.w; ++px) std::memcpy(d + px * 8, src + px * s.cin, 32);
            } else {
              for (int px = 0; px < s.w; ++px)
                for (int c = 0; c < 8; ++c) d[px * 8 + c] = c < width ? src[px * s.cin + c] : 0.0f;
            }
          }
        }
      }
      // The block's output gradient (contiguous in dy), one [pixels][tile width] panel per
      // column tile.
      const int64_t image_pixels = static_cast<int64_t>(nrows) * s.wo;
      const int64_t pixels = nimg * image_pixels;
      const float* g = dyp + (n0 * s.ho + ho0) * static_cast<int64_t>(s.wo) * s.cout;
      for (size_t ti = t0; ti < t1; ++ti) {
        const auto [c0, nv] = col_tiles[ti];
        float* panel = grad.data() + pixels * c0;
        const int width = nv * kLanes, valid = std::max(0, std::min(width, s.cout - c0));
        for (int64_t px = 0; px < pixels; ++px) {
          std::memcpy(panel + px * width, g + px * s.cout + c0, sizeof(float) * valid);
          std::memset(panel + px * width + valid, 0, sizeof(float) * (width - valid));
        }
      }
      for (int i = 0; i < s.kh; ++i) {
        for (int j = 0; j < s.kw; ++j) {
          const int64_t off = (static_cast<int64_t>(i) * s.wpad + j) * 8;
          float* c_tap = acc + (i * s.kw + j) * tap_size;
          for (size_t ti = t0; ti < t1; ++ti) {
            const auto [c0, nv] = col_tiles[ti];
            const int width = nv * kLanes;
            for (int gi = 0; gi < groups; ++gi) {
              float* c = c_tap + static_cast<size_t>(gi) * 8 * s.coutp + c0;
              for (int im = 0; im < nimg; ++im) {
                const float* a = planes.data() + gi * plane + im * image_plane;
                const float* panel = grad.data() + pixels * c0 + im * image_pixels * width;
                if (nv == 2)
                  micro_wgrad<2>(a, off, s.wpad, nrows, s.wo, panel, c, s.coutp);
                else
                  micro_wgrad<1>(a, off, s.wpad, nrows, s.wo, panel, c, s.coutp);
              }
            }
          }
        }
      }
    }
  };
  // dW[t][ci][columns] <- acc ([taps][cinp][coutp]) for the columns [c_begin, c_end).
  float* out = dw->typed_data<float>();
  auto copy_out = [&](const float* acc, int c_begin, int c_end) {
    for (int t = 0; t < taps; ++t)
      for (int ci = 0; ci < s.cin; ++ci)
        std::memcpy(out + (static_cast<int64_t>(t) * s.cin + ci) * s.cout + c_begin,
                    acc + t * tap_size + static_cast<size_t>(ci) * s.coutp + c_begin,
                    sizeof(float) * (c_end - c_begin));
  };
  if (split_channels) {
    // One shared accumulator; each thread zeroes, fills and copies out its own columns.
    std::unique_ptr<float[]> acc(new float[taps * tap_size]);
    parallel_ranges(pool, col_tiles.size(), [&](int64_t t0, int64_t t1) {
      const int c_begin = col_tiles[t0].first;
      const int c_end = t1 < static_cast<int64_t>(col_tiles.size()) ? col_tiles[t1].first : s.coutp;
      for (size_t row = 0; row < static_cast<size_t>(taps) * cinp; ++row)
        std::memset(acc.get() + row * s.coutp + c_begin, 0, sizeof(float) * (c_end - c_begin));
      work(0, bl.blocks, t0, t1, acc.get());
      copy_out(acc.get(), c_begin, std::min(c_end, s.cout));
    });
    return ffi::Error::Success();
  }
  AlignedFloats total(taps * tap_size, 0.0f);
  std::mutex total_mutex;
  parallel_ranges(pool, bl.blocks, [&](int64_t b0, int64_t b1) {
    AlignedFloats partial(taps * tap_size, 0.0f);
    work(b0, b1, 0, col_tiles.size(), partial.data());
    std::lock_guard<std::mutex> lock(total_mutex);
    for (size_t i = 0; i < total.size(); ++i) total[i] += partial[i];
  });
  copy_out(total.data(), 0, s.cout);
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
                                  .Attr<int64_t>("flipped")
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
