// GGUF 4-bit linears (`--quantization gguf`): q4_linear, y = x W^T (+ bias) for 4-bit weight
// blocks (Q4_1, Q4_0 converted to them) times per-block int8 activations. decode_layers.cpp
// calls it for a linear whose weight slot is uint8.
//
// Definitions. A weight block is 32 consecutive input channels of one output channel n:
// w[n, k] = d[n, b] * q[n, k] + m[n, b], q in 0..15, d and m float16 (GGUF's Q4_1). Each row
// of x is quantized per 32-channel block too (llama.cpp's Q8_1 idea): dx[r, b] = max |x| / 127,
// xq[r, k] = round(x / dx) in -127..127, s[r, b] = dx * sum_k xq[r, k]. Then
//     y[r, n] = sum_b ( float(isum[r, n, b]) * (d[n, b] * dx[r, b]) + m[n, b] * s[r, b] )
// with isum = sum over the block of q * xq, exact in integers; the float terms are added in
// block order with two FMAs each, then the bias. Every output element gets this same sequence
// of operations whatever the tile, the thread split or the other rows: a row's result
// depends on that row alone (batch invariance), and 1 or 2 threads give the same bits.
//
// Integer products: AVX2 without VNNI multiplies bytes with vpmaddubsw (uint8 x int8, pairs
// summed in int16 with saturation). The weights are the unsigned side (0..15), the activations
// the signed one: a pair is at most 2 x 15 x 127 = 3810, and the 8 vpmaddubsw results of one
// block (16 products per int16 lane) at most 30480 < 32767, so a block's sums are accumulated
// in int16 and widened once per block with vpmaddwd(ones): one widening per 32 products
// instead of one per 4 (what the int8 kernel pays).
//
// Weight layout (packed at load by shoal/model/gguf_quant.py's pack_q4): panels of 8 output
// channels, [ceil(N / 8)][K / 32][160] bytes, one 160-byte record per panel and block:
//     bytes   0..15   d of the 8 channels (float16)
//     bytes  16..31   m of the 8 channels (float16)
//     bytes  32..159  four 32-byte groups g = 0..3, byte 4 c + j of group g holding
//                     q[c, 8 g + j] in its low nibble and q[c, 8 g + 4 + j] in its high one
// so a panel streams linearly through memory (5 bits per weight: half the bytes of the int8
// path's 8, plus the 1/4 bit of scales) and one 32-byte load, masked or shifted, gives 4
// consecutive input channels of the 8 outputs, the int8 kernel's [8][4] lane order: a row's 4
// activation bytes broadcast against it, vpmaddubsw leaves each output's sums in its own lanes
// and no horizontal sums are needed.

#include "shared.h"

#include <cstring>

namespace shoal_native {
namespace {

constexpr int64_t kBlock = 32;         // input channels per block
constexpr int64_t kRecord = 160;       // bytes per (panel, block)
constexpr int64_t kScaleBytes = 32;    // d and m of a record

struct Q4Problem {
  const int8_t* a;   // quantized rows, [M, K]
  const float* dx;   // [M, KB] activation scales
  const float* s;    // [M, KB] dx * sum of the block's xq
  int64_t K, KB;
  const uint8_t* w;  // packed, [ceil(N / 8), KB, kRecord]
  const float* bias; // or nullptr
  float* y;          // [M, N]
  int64_t N;
};

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// One block's integer sums for 4 rows x 2 panels, in assembly: GCC's schedule of the
// intrinsic tile kept most products on the stack (a store and a reload per vpmaddubsw). The
// eight int16 sums and the nibble mask are operands (registers); ymm10-15 hold the unpacked
// weights of both panels, the broadcast activation bytes and a product. `a` is the block's
// first row (row stride K bytes), w0 / w1 the two panels' 128 bytes of nibbles.
inline void q4_block_sums_4x2(const int8_t* a, int64_t K, const uint8_t* w0, const uint8_t* w1,
                              __m256i low4, __m256i (&isum)[4][2]) {
  __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00,
          s30 = s00, s31 = s00;
  const int64_t K3 = 3 * K;
  // Row products of one group: the low nibbles (ymm10 / ymm12) against the 4 activation bytes
  // at OFF, the high ones (ymm11 / ymm13) against those at OFF + 4.
#define SHOAL_Q4_ROW(LO, HI, S0, S1)                  \
  "vpbroadcastd " LO ", %%ymm14\n\t"                  \
  "vpmaddubsw %%ymm14, %%ymm10, %%ymm15\n\t"          \
  "vpaddw %%ymm15, %[" S0 "], %[" S0 "]\n\t"          \
  "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t"          \
  "vpaddw %%ymm15, %[" S1 "], %[" S1 "]\n\t"          \
  "vpbroadcastd " HI ", %%ymm14\n\t"                  \
  "vpmaddubsw %%ymm14, %%ymm11, %%ymm15\n\t"          \
  "vpaddw %%ymm15, %[" S0 "], %[" S0 "]\n\t"          \
  "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t"          \
  "vpaddw %%ymm15, %[" S1 "], %[" S1 "]\n\t"
#define SHOAL_Q4_GROUP(WOFF, LO, HI)                                      \
  "vmovdqu " WOFF "(%[w0]), %%ymm11\n\t"                                  \
  "vpand %[low4], %%ymm11, %%ymm10\n\t"                                   \
  "vpsrlw $4, %%ymm11, %%ymm11\n\t"                                       \
  "vpand %[low4], %%ymm11, %%ymm11\n\t"                                   \
  "vmovdqu " WOFF "(%[w1]), %%ymm13\n\t"                                  \
  "vpand %[low4], %%ymm13, %%ymm12\n\t"                                   \
  "vpsrlw $4, %%ymm13, %%ymm13\n\t"                                       \
  "vpand %[low4], %%ymm13, %%ymm13\n\t"                                   \
  SHOAL_Q4_ROW(LO "(%[a])", HI "(%[a])", "s00", "s01")                    \
  SHOAL_Q4_ROW(LO "(%[a], %[k])", HI "(%[a], %[k])", "s10", "s11")        \
  SHOAL_Q4_ROW(LO "(%[a], %[k], 2)", HI "(%[a], %[k], 2)", "s20", "s21")  \
  SHOAL_Q4_ROW(LO "(%[a], %[k3])", HI "(%[a], %[k3])", "s30", "s31")
  asm("" SHOAL_Q4_GROUP("0", "0", "4") SHOAL_Q4_GROUP("32", "8", "12")
          SHOAL_Q4_GROUP("64", "16", "20") SHOAL_Q4_GROUP("96", "24", "28")
      : [s00] "+x"(s00), [s01] "+x"(s01), [s10] "+x"(s10), [s11] "+x"(s11), [s20] "+x"(s20),
        [s21] "+x"(s21), [s30] "+x"(s30), [s31] "+x"(s31)
      : [a] "r"(a), [k] "r"(K), [k3] "r"(K3), [w0] "r"(w0), [w1] "r"(w1), [low4] "x"(low4)
      : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
#undef SHOAL_Q4_GROUP
#undef SHOAL_Q4_ROW
  isum[0][0] = s00; isum[0][1] = s01; isum[1][0] = s10; isum[1][1] = s11;
  isum[2][0] = s20; isum[2][1] = s21; isum[3][0] = s30; isum[3][1] = s31;
}

// The same for 1 row x 4 panels (decode of one or two requests), panels `stride` bytes
// apart.
inline void q4_block_sums_1x4(const int8_t* a, const uint8_t* w0, int64_t stride, __m256i low4,
                              __m256i (&isum)[1][4]) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  const int64_t stride3 = 3 * stride;
#define SHOAL_Q4_PANEL(W, S)                          \
  "vmovdqu " W ", %%ymm13\n\t"                        \
  "vpand %[low4], %%ymm13, %%ymm12\n\t"               \
  "vpsrlw $4, %%ymm13, %%ymm13\n\t"                   \
  "vpand %[low4], %%ymm13, %%ymm13\n\t"               \
  "vpmaddubsw %%ymm10, %%ymm12, %%ymm14\n\t"          \
  "vpaddw %%ymm14, %[" S "], %[" S "]\n\t"            \
  "vpmaddubsw %%ymm11, %%ymm13, %%ymm15\n\t"          \
  "vpaddw %%ymm15, %[" S "], %[" S "]\n\t"
#define SHOAL_Q4_GROUP1(WOFF, LO, HI)                          \
  "vpbroadcastd " LO "(%[a]), %%ymm10\n\t"                     \
  "vpbroadcastd " HI "(%[a]), %%ymm11\n\t"                     \
  SHOAL_Q4_PANEL(WOFF "(%[w])", "s0")                          \
  SHOAL_Q4_PANEL(WOFF "(%[w], %[st])", "s1")                   \
  SHOAL_Q4_PANEL(WOFF "(%[w], %[st], 2)", "s2")                \
  SHOAL_Q4_PANEL(WOFF "(%[w], %[st3])", "s3")
  asm("" SHOAL_Q4_GROUP1("0", "0", "4") SHOAL_Q4_GROUP1("32", "8", "12")
          SHOAL_Q4_GROUP1("64", "16", "20") SHOAL_Q4_GROUP1("96", "24", "28")
      : [s0] "+x"(s0), [s1] "+x"(s1), [s2] "+x"(s2), [s3] "+x"(s3)
      : [a] "r"(a), [w] "r"(w0), [st] "r"(stride), [st3] "r"(stride3), [low4] "x"(low4)
      : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory");
#undef SHOAL_Q4_GROUP1
#undef SHOAL_Q4_PANEL
  isum[0][0] = s0; isum[0][1] = s1; isum[0][2] = s2; isum[0][3] = s3;
}

// One block's integer sums with VNNI (shared.h), MT rows x NV panels `stride` bytes apart:
// vpdpbusd takes the unsigned weight nibbles and the signed activation bytes as they are and
// adds 4 products straight into int32 lanes, so there are no int16 sums to widen and no
// saturation bound to respect. GCC keeps these intrinsics in registers (8 int32 sums for 4 x
// 2; the disassembly has no stack traffic in the block loop), so no assembly.
template <int MT, int NV>
inline void q4_block_sums_vnni(const int8_t* a, int64_t K, const uint8_t* w0, int64_t stride,
                               __m256i low4, __m256i (&isum)[MT][NV]) {
#if SHOAL_VNNI
#pragma GCC unroll 4
  for (int g = 0; g < 4; g++) {
    __m256i lo[NV], hi[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) {
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + j * stride + 32 * g));
      lo[j] = _mm256_and_si256(raw, low4);
      hi[j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MT; i++) {
      const __m256i a_lo = broadcast4(a + i * K + 8 * g);
      const __m256i a_hi = broadcast4(a + i * K + 8 * g + 4);
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) {
        isum[i][j] = _mm256_dpbusd_epi32(isum[i][j], lo[j], a_lo);
        isum[i][j] = _mm256_dpbusd_epi32(isum[i][j], hi[j], a_hi);
      }
    }
  }
#else
  (void)a, (void)K, (void)w0, (void)stride, (void)low4, (void)isum;
#endif
}

// y[m0 .. m0 + MT, n0 .. n0 + 8 NV): MT rows against NV panels (n0 % 8 == 0, every panel
// starting below N).
template <int MT, int NV>
inline void q4_tile(const Q4Problem& p, int64_t m0, int64_t n0) {
  const int64_t KB = p.KB, K = p.K;
  const uint8_t* w = p.w + (n0 / 8) * KB * kRecord;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT][NV];
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < NV; j++) acc[i][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; b++) {
    __m256i isum[MT][NV];
    for (int i = 0; i < MT; i++)
      for (int j = 0; j < NV; j++) isum[i][j] = _mm256_setzero_si256();
    const int8_t* ab = p.a + m0 * K + b * kBlock;
    if constexpr (SHOAL_VNNI) {
      q4_block_sums_vnni<MT, NV>(ab, K, w + b * kRecord + kScaleBytes, KB * kRecord, low4,
                                 isum);
    } else if constexpr (MT == 4 && NV == 2) {
      q4_block_sums_4x2(ab, K, w + b * kRecord + kScaleBytes, w + (KB + b) * kRecord + kScaleBytes,
                        low4, isum);
    } else if constexpr (MT == 1 && NV == 4) {
      q4_block_sums_1x4(ab, w + b * kRecord + kScaleBytes, KB * kRecord, low4, isum);
    } else
    for (int g = 0; g < 4; g++) {
      __m256i lo[NV], hi[NV];
      for (int j = 0; j < NV; j++) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
            w + (j * KB + b) * kRecord + kScaleBytes + 32 * g));
        lo[j] = _mm256_and_si256(raw, low4);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
      }
      for (int i = 0; i < MT; i++) {
        const __m256i a_lo = broadcast4(ab + i * K + 8 * g);
        const __m256i a_hi = broadcast4(ab + i * K + 8 * g + 4);
        for (int j = 0; j < NV; j++) {
          isum[i][j] = _mm256_add_epi16(isum[i][j], _mm256_maddubs_epi16(lo[j], a_lo));
          isum[i][j] = _mm256_add_epi16(isum[i][j], _mm256_maddubs_epi16(hi[j], a_hi));
        }
      }
    }
    for (int j = 0; j < NV; j++) {
      const uint8_t* rec = w + (j * KB + b) * kRecord;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
      const __m256 mn =
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + 16)));
      for (int i = 0; i < MT; i++) {
        const int64_t rb = (m0 + i) * KB + b;
        // Without VNNI the block's sums are int16 pairs, widened here; with it, int32 already.
        const __m256 sums = _mm256_cvtepi32_ps(SHOAL_VNNI ? isum[i][j]
                                                          : _mm256_madd_epi16(isum[i][j], ones));
        acc[i][j] = _mm256_fmadd_ps(sums, _mm256_mul_ps(d, _mm256_set1_ps(p.dx[rb])), acc[i][j]);
        acc[i][j] = _mm256_fmadd_ps(mn, _mm256_set1_ps(p.s[rb]), acc[i][j]);
      }
    }
  }
  const int64_t N = p.N;
  for (int j = 0; j < NV; j++) {
    const int64_t n = n0 + 8 * j;
    const bool full = n + 8 <= N;
    __m256 bias = _mm256_setzero_ps();
    if (p.bias)
      bias = full ? _mm256_loadu_ps(p.bias + n) : _mm256_maskload_ps(p.bias + n, lane_mask(n, N));
    for (int i = 0; i < MT; i++) {
      const __m256 v = p.bias ? _mm256_add_ps(acc[i][j], bias) : acc[i][j];
      float* yr = p.y + (m0 + i) * N + n;
      if (full)
        _mm256_storeu_ps(yr, v);
      else
        _mm256_maskstore_ps(yr, lane_mask(n, N), v);
    }
  }
}

// Rows [m0, m1) x output channels [nb, ne) (nb % 8 == 0): NV panels at a time (then one by
// one) outer, MT-row tiles inner, so a panel group stays in L1 while the rows pass over it.
// The next group is prefetched a share before each full tile, as int8.cpp's int8_block does
// and for the same reason (the first tile of a group would otherwise wait on memory).
template <int MT, int NV>
void q4_block(const Q4Problem& p, int64_t m0, int64_t m1, int64_t nb, int64_t ne) {
  static_assert(MT >= 1 && MT <= 4, "tiles of up to 4 rows");
  const int64_t panel_bytes = p.KB * kRecord, tiles = (m1 - m0 + MT - 1) / MT;
  auto rows = [&](auto tile_nv, int64_t n) {
    constexpr int V = decltype(tile_nv)::value;
    const int64_t group_bytes = V * panel_bytes;
    const int64_t share = tiles > 1 ? (group_bytes / 64 + tiles - 1) / tiles * 64 : 0;
    const char* next = reinterpret_cast<const char*>(p.w + (n / 8 + V) * panel_bytes);
    int64_t fetched = 0, m = m0;
    for (; m + MT <= m1; m += MT) {
      for (const int64_t end = std::min(fetched + share, group_bytes); fetched < end;
           fetched += 64)
        _mm_prefetch(next + fetched, _MM_HINT_T0);
      q4_tile<MT, V>(p, m, n);
    }
    switch (m1 - m) {  // the last 1 .. MT - 1 rows
      case 3: q4_tile<3, V>(p, m, n); break;
      case 2: q4_tile<2, V>(p, m, n); break;
      case 1: q4_tile<1, V>(p, m, n); break;
      default: break;
    }
  };
  int64_t n = nb;
  for (; n + 8 * (NV - 1) < ne; n += 8 * NV) rows(std::integral_constant<int, NV>{}, n);
  for (; n < ne; n += 8) rows(std::integral_constant<int, 1>{}, n);
}

// One row's blocks: xq (int8), dx and s = dx * sum(xq) per block. Vector code only (K % 32
// == 0), so every row is quantized by the same instructions. x * (1 / dx) is rounded to
// nearest even (vcvtps2dq, default rounding); |x / dx| <= 127 so the saturating packs change
// nothing.
inline void quantize_row_blocks(const float* x, int64_t KB, int8_t* q, float* dx, float* s) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < KB; b++) {
    const float* xb = x + b * kBlock;
    __m256 v[4];
    for (int t = 0; t < 4; t++) v[t] = _mm256_loadu_ps(xb + 8 * t);
    __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask),
                                              _mm256_and_ps(v[1], abs_mask)),
                                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask),
                                              _mm256_and_ps(v[3], abs_mask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float mx = _mm_cvtss_f32(m4);
    const float scale = mx > 0.f ? mx / 127.f : 1.f;
    const __m256 inv = _mm256_set1_ps(1.f / scale);
    __m256i qi[4];
    for (int t = 0; t < 4; t++) qi[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], inv));
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]),
                                           _mm256_add_epi32(qi[2], qi[3]));
    __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
    t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
    const __m256i lo = _mm256_packs_epi32(qi[0], qi[1]);
    const __m256i hi = _mm256_packs_epi32(qi[2], qi[3]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock),
                        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order));
    dx[b] = scale;
    s[b] = scale * static_cast<float>(_mm_cvtsi128_si32(t4));
  }
}

}  // namespace

// y = x W^T (+ bias) for W in pack_q4's layout with `n_out` output channels.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, int64_t n_out,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "q4_linear: x must be a contiguous 2-D float32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = n_out;
  TORCH_CHECK(K % kBlock == 0 && K > 0,
              "q4_linear: the input size must be a positive multiple of 32 (GGUF blocks), got ",
              K);
  const int64_t KB = K / kBlock;
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() &&
                  w.size(0) == (N + 7) / 8 && w.size(1) == KB && w.size(2) == kRecord,
              "q4_linear: w must be contiguous uint8 [ceil(N / 8), K / 32, 160] (pack_q4)");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == N && bias->scalar_type() == at::kFloat &&
                                    bias->is_contiguous()),
              "q4_linear: bias must be contiguous float32 [N]");
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto a = at::empty({M, K}, x.options().dtype(at::kChar));
  auto dx = at::empty({M, KB}, x.options());
  auto s = at::empty({M, KB}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float* dxp = dx.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      quantize_row_blocks(xp + r * K, KB, ap + r * K, dxp + r * KB, sp + r * KB);
  });
  const Q4Problem p{ap, dxp, sp, K, KB, w.data_ptr<uint8_t>(),
                    bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), N};
  // Work items as in int8_linear (shared.h).
  for_each_work_item(M, N, [&](int64_t mb, int64_t me, int64_t nb, int64_t ne) {
    if (me - mb > 2)
      q4_block<4, 2>(p, mb, me, nb, ne);
    else
      q4_block<1, 4>(p, mb, me, nb, ne);
  });
  return y;
}

}  // namespace shoal_native
