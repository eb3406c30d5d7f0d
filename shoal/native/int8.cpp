// int8 linears (`--quantization int8`): int8_linear, y = x W^T (+ bias) for 7-bit weights and
// per-row int8 activations with exact int32 sums, and int8_linear_argmax, the greedy LM head's
// (argmax id, max logit) of each row of that product without writing it. (Longer than the
// other sources: the two share everything up to the tile's last store, and the main loops
// for AVX2 and for VNNI are written out in assembly, for reasons given at each.)
//
// Activations: each row's main channels are quantized symmetrically, scale = max |x| / 127,
// and stored as uint8 (q + 128) so that vpmaddubsw (uint8 x int8 -> pairs summed in int16)
// can multiply them. Weights have 7 bits (|w| <= 63): 2 x 255 x 63 < 32768, so the int16 pair
// sums never saturate. The +128 offset is removed with the weight row's precomputed sum:
//     sum_k (q_k + 128) w_k = sum_k q_k w_k + 128 * colsum.
// A few outlier input channels (chosen at load) skip quantization: they are added in float32
// in the epilogue (a second int8 group with its own scales lost top-1 agreement with float32:
// the outliers differ from each other by 10-100x too).
//
// Weight layout (packed once at load by shoal/model/int8.py's quantize_columns):
// [ceil(N / 8)][K4 / 4][8][4] int8, K4 = the main channels rounded up to a multiple of 4, zero
// padded in both directions. A "panel" is 8 output channels over all of K4; within it, one
// 32-byte load holds 4 consecutive input channels of each of the 8 outputs. Broadcasting a
// row's 4 activation bytes (vpbroadcastd) against that load, vpmaddubsw + vpmaddwd(ones)
// gives the 8 outputs' partial sums over those 4 channels in 8 int32 lanes: accumulators are
// 8 output channels wide and need no horizontal sum at the end (an [N, K] layout, one
// accumulator per (row, output channel), spends time on horizontal sums and keeps only 2
// output channels per tile in registers).
//
// Register tile: 5 rows x 2 panels (16 output channels) = 10 int32 accumulators, plus the two
// weight vectors, the broadcast activations, the ones and a temporary: all 16 ymm registers
// (6 x 2 spills; 4 x 2, 3 x 4 and 4 x 3 were slower). Per 4 input channels that is 2 loads +
// 5 broadcasts for 10 x (vpmaddubsw, vpmaddwd, vpaddd): the two multiplies per 32 products
// are what bounds it (they share 2 ports). 1 or 2 rows take 4 panels (32 output channels) per
// tile, so the 1-row (decode) case loads 4 weight vectors per broadcast; 3 and 4 rows keep 2
// panels. With VNNI (shared.h) and its 32 registers every tile is up to 5 rows x 4 panels
// (int8_main_vnni). The 5 x 2 main loop is inline assembly (int8_main_5x2): GCC kept half of
// the intrinsic version's accumulators on the stack, a store and a reload each per 4 input
// channels; in registers the same operations give the same bits, faster.
//
// Blocking: a work item is 40 rows x 128 output channels (32 when all rows fit one block:
// more items to share between threads; shared.h's for_each_work_item). Inside it, panels
// outer, rows inner: the 40 rows' activations (23 KB at K = 576) and the current 16-channel
// weight panel pair (9 KB) stay in L1 while the panels stream from L2 (128 rows inner, 72 KB
// of activations, came from L2 on every panel and was slower).
//
// Epilogue fused into the tile: the int32 sums go straight from registers to float (sum -
// 128 colsum, times the row scale, times the weight scale), then the outlier channels are
// added in input order with one FMA each (the outlier weight vector is loaded once for all of
// the tile's rows), then the bias. Every output element gets exactly the same operations in
// the same order whatever the tile, thread split or batch: results do not depend on them
// (batch invariance), and the greedy head's logits are int8_linear's, bit for bit.

#include "shared.h"

#include <cstring>

namespace shoal_native {
namespace {

struct Int8Problem {
  const uint8_t* a;      // quantized rows, [M, K4] (q + 128, padding 128)
  int64_t K4;            // padded main channels, % 4 == 0
  const int8_t* w;       // packed weights, [ceil(N / 8)][K4 / 4][8][4]
  const float* row_scale;
  const float* xo;       // the rows' outlier channels, [M, K_out]
  int64_t K_out;
  const float* ow;       // outlier weights blocked by 8 outputs, [ceil(N / 8), K_out, 8]
  const int32_t* colsum;
  const float* w_scale;
  const float* bias;     // or nullptr
  float* y;              // [M, N], or nullptr when `best` is set
  int64_t N;
  // int8_linear_argmax: the rows' running argmax per thread, [threads][M], instead of y.
  LaneBest* best;
  int64_t M;
};

inline __m256 load_cols(const float* p, int64_t n, int64_t N) {
  return n + 8 <= N ? _mm256_loadu_ps(p + n) : _mm256_maskload_ps(p + n, lane_mask(n, N));
}

inline __m256i load_cols(const int32_t* p, int64_t n, int64_t N) {
  return n + 8 <= N ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + n))
                    : _mm256_maskload_epi32(p + n, lane_mask(n, N));
}

// The 5-row x 2-panel main loop (why in assembly: the file's opening comment). The ten accumulators
// and the ones vector are operands, so the compiler gives them registers; ymm11-15 hold the
// two weight vectors, the broadcast row bytes and two products. Same operations per element
// as the intrinsic loop of int8_tile.
inline void int8_main_5x2(const uint8_t* a, int64_t K4, const int8_t* w, int64_t panel,
                          __m256i ones, __m256i (&acc)[5][2]) {
  if (K4 <= 0) return;
  const uint8_t* a0 = a;
  const int64_t K4x3 = 3 * K4;
  int64_t n = K4 / 4;
  __m256i c00 = acc[0][0], c01 = acc[0][1], c10 = acc[1][0], c11 = acc[1][1], c20 = acc[2][0],
          c21 = acc[2][1], c30 = acc[3][0], c31 = acc[3][1], c40 = acc[4][0], c41 = acc[4][1];
#define SHOAL_ROW(ADDR, C0, C1)                        \
  "vpbroadcastd " ADDR ", %%ymm13\n\t"                 \
  "vpmaddubsw %%ymm11, %%ymm13, %%ymm14\n\t"           \
  "vpmaddubsw %%ymm12, %%ymm13, %%ymm15\n\t"           \
  "vpmaddwd %[ones], %%ymm14, %%ymm14\n\t"             \
  "vpmaddwd %[ones], %%ymm15, %%ymm15\n\t"             \
  "vpaddd %%ymm14, %[" C0 "], %[" C0 "]\n\t"           \
  "vpaddd %%ymm15, %[" C1 "], %[" C1 "]\n\t"
  asm volatile(
      "1:\n\t"
      "vmovdqu (%[w]), %%ymm11\n\t"
      "vmovdqu (%[w], %[panel]), %%ymm12\n\t"
      SHOAL_ROW("(%[a0])", "c00", "c01")
      SHOAL_ROW("(%[a0], %[k4])", "c10", "c11")
      SHOAL_ROW("(%[a0], %[k4], 2)", "c20", "c21")
      SHOAL_ROW("(%[a0], %[k4x3])", "c30", "c31")
      SHOAL_ROW("(%[a0], %[k4], 4)", "c40", "c41")
      "add $4, %[a0]\n\t"
      "add $32, %[w]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20),
        [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41),
        [a0] "+r"(a0), [w] "+r"(w), [n] "+r"(n)
      : [ones] "x"(ones), [k4] "r"(K4), [k4x3] "r"(K4x3), [panel] "r"(panel)
      : "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
#undef SHOAL_ROW
  acc[0][0] = c00; acc[0][1] = c01; acc[1][0] = c10; acc[1][1] = c11; acc[2][0] = c20;
  acc[2][1] = c21; acc[3][0] = c30; acc[3][1] = c31; acc[4][0] = c40; acc[4][1] = c41;
}

// The main loop with VNNI (shared.h): one vpdpbusd per row and panel for every 4 input
// channels, the same int32 sums as vpmaddubsw + vpmaddwd + vpaddd. With 32 registers the
// tile is up to 5 rows x 4 panels: row r's 4 accumulators in ymm(4r) .. ymm(4r + 3), the 4
// weight vectors in ymm27-30, the broadcast row bytes in ymm31. The loop is assembly with
// fixed registers: GCC 12 gives the vpdpbusd intrinsic only ymm0-15 as its accumulator and
// shuffled the intrinsic loop's accumulators through the upper registers and the stack on
// every step, and 20 accumulators as asm operands exceed GCC's 30-operand limit. So the
// assembly zeroes them itself and stores them to `out` ([MT][4] x 8 int32) once at the end.
#if SHOAL_VNNI
#define SHOAL_VROW(ADDR, A, B, C, D)                 \
  "vpbroadcastd " ADDR ", %%ymm31\n\t"               \
  "vpdpbusd %%ymm27, %%ymm31, %%ymm" A "\n\t"        \
  "vpdpbusd %%ymm28, %%ymm31, %%ymm" B "\n\t"        \
  "vpdpbusd %%ymm29, %%ymm31, %%ymm" C "\n\t"        \
  "vpdpbusd %%ymm30, %%ymm31, %%ymm" D "\n\t"
#define SHOAL_VROWS1 SHOAL_VROW("(%[a0])", "0", "1", "2", "3")
#define SHOAL_VROWS2 SHOAL_VROWS1 SHOAL_VROW("(%[a0], %[k4])", "4", "5", "6", "7")
#define SHOAL_VROWS3 SHOAL_VROWS2 SHOAL_VROW("(%[a0], %[k4], 2)", "8", "9", "10", "11")
#define SHOAL_VROWS4 SHOAL_VROWS3 SHOAL_VROW("(%[a0], %[k4x3])", "12", "13", "14", "15")
#define SHOAL_VROWS5 SHOAL_VROWS4 SHOAL_VROW("(%[a0], %[k4], 4)", "16", "17", "18", "19")
#define SHOAL_VZERO(A, B, C, D)                                                  \
  "vpxord %%ymm" A ", %%ymm" A ", %%ymm" A "\n\t"                                \
  "vpxord %%ymm" B ", %%ymm" B ", %%ymm" B "\n\t"                                \
  "vpxord %%ymm" C ", %%ymm" C ", %%ymm" C "\n\t"                                \
  "vpxord %%ymm" D ", %%ymm" D ", %%ymm" D "\n\t"
#define SHOAL_VZERO1 SHOAL_VZERO("0", "1", "2", "3")
#define SHOAL_VZERO2 SHOAL_VZERO1 SHOAL_VZERO("4", "5", "6", "7")
#define SHOAL_VZERO3 SHOAL_VZERO2 SHOAL_VZERO("8", "9", "10", "11")
#define SHOAL_VZERO4 SHOAL_VZERO3 SHOAL_VZERO("12", "13", "14", "15")
#define SHOAL_VZERO5 SHOAL_VZERO4 SHOAL_VZERO("16", "17", "18", "19")
#define SHOAL_VSTORE(OFF, A, B, C, D)                \
  "vmovdqu32 %%ymm" A ", " OFF "+0(%[out])\n\t"        \
  "vmovdqu32 %%ymm" B ", " OFF "+32(%[out])\n\t"       \
  "vmovdqu32 %%ymm" C ", " OFF "+64(%[out])\n\t"       \
  "vmovdqu32 %%ymm" D ", " OFF "+96(%[out])\n\t"
#define SHOAL_VSTORE1 SHOAL_VSTORE("0", "0", "1", "2", "3")
#define SHOAL_VSTORE2 SHOAL_VSTORE1 SHOAL_VSTORE("128", "4", "5", "6", "7")
#define SHOAL_VSTORE3 SHOAL_VSTORE2 SHOAL_VSTORE("256", "8", "9", "10", "11")
#define SHOAL_VSTORE4 SHOAL_VSTORE3 SHOAL_VSTORE("384", "12", "13", "14", "15")
#define SHOAL_VSTORE5 SHOAL_VSTORE4 SHOAL_VSTORE("512", "16", "17", "18", "19")
#define SHOAL_VNNI_TILE(R)                                                              \
  asm volatile(SHOAL_VZERO##R                                                           \
               "1:\n\t"                                                                 \
               "vmovdqu32 (%[w]), %%ymm27\n\t"                                            \
               "vmovdqu32 (%[w], %[panel]), %%ymm28\n\t"                                  \
               "vmovdqu32 (%[w], %[panel], 2), %%ymm29\n\t"                               \
               "vmovdqu32 (%[w], %[panel3]), %%ymm30\n\t"                                 \
               SHOAL_VROWS##R                                                           \
               "add $4, %[a0]\n\t"                                                      \
               "add $32, %[w]\n\t"                                                      \
               "dec %[n]\n\t"                                                           \
               "jnz 1b\n\t"                                                             \
               SHOAL_VSTORE##R                                                          \
               : [a0] "+r"(a0), [w] "+r"(w), [n] "+r"(n)                                \
               : [k4] "r"(K4), [k4x3] "r"(3 * K4), [panel] "r"(panel),                  \
                 [panel3] "r"(3 * panel), [out] "r"(&acc[0][0])                         \
               : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",   \
                 "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16",  \
                 "xmm17", "xmm18", "xmm19", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31", \
                 "cc", "memory")
#endif

// acc[MT][4] = the tile's int32 sums (written, not accumulated into; K4 == 0 leaves acc as
// it is, zero).
template <int MT>
inline void int8_main_vnni(const uint8_t* a, int64_t K4, const int8_t* w, int64_t panel,
                           __m256i (&acc)[MT][4]) {
#if SHOAL_VNNI
  static_assert(MT >= 1 && MT <= 5, "tiles of 1 to 5 rows");
  if (K4 <= 0) return;
  const uint8_t* a0 = a;
  int64_t n = K4 / 4;
  if constexpr (MT == 5) SHOAL_VNNI_TILE(5);
  else if constexpr (MT == 4) SHOAL_VNNI_TILE(4);
  else if constexpr (MT == 3) SHOAL_VNNI_TILE(3);
  else if constexpr (MT == 2) SHOAL_VNNI_TILE(2);
  else SHOAL_VNNI_TILE(1);
#else
  (void)a, (void)K4, (void)w, (void)panel, (void)acc;
#endif
}

// y[m0 .. m0 + MT, n0 .. n0 + 8 NV): MT rows against NV panels, n0 % 8 == 0, every panel
// starting below N.
template <int MT, int NV>
inline void int8_tile(const Int8Problem& p, int64_t m0, int64_t n0) {
  const int64_t K4 = p.K4, panel = K4 * 8;
  const int8_t* w = p.w + (n0 / 8) * panel;
  const uint8_t* a = p.a + m0 * K4;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MT][NV];
  for (int i = 0; i < MT; i++)
    for (int j = 0; j < NV; j++) acc[i][j] = _mm256_setzero_si256();
  if constexpr (SHOAL_VNNI && NV == 4) {
    int8_main_vnni<MT>(a, K4, w, panel, acc);
  } else if constexpr (MT == 5 && NV == 2) {
    int8_main_5x2(a, K4, w, panel, ones, acc);
  } else
  for (int64_t k = 0; k < K4; k += 4) {
    __m256i wv[NV];
    for (int j = 0; j < NV; j++)
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * panel + k * 8));
    for (int i = 0; i < MT; i++) {
      int32_t a4;
      std::memcpy(&a4, a + i * K4 + k, 4);
      const __m256i av = _mm256_set1_epi32(a4);
      for (int j = 0; j < NV; j++)
        acc[i][j] = _mm256_add_epi32(acc[i][j],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(av, wv[j]), ones));
    }
  }

  const int64_t N = p.N, K_out = p.K_out;
  const __m256i c128 = _mm256_set1_epi32(128);
  __m256 v[MT][NV];
  for (int j = 0; j < NV; j++) {
    const int64_t n = n0 + 8 * j;
    const __m256i offset = _mm256_mullo_epi32(c128, load_cols(p.colsum, n, N));
    const __m256 ws = load_cols(p.w_scale, n, N);
    for (int i = 0; i < MT; i++) {
      const __m256 sv = _mm256_set1_ps(p.row_scale[m0 + i]);
      v[i][j] = _mm256_mul_ps(
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][j], offset)), sv), ws);
    }
  }
  const float* ow = p.ow + (n0 / 8) * K_out * 8;
  const float* xo = p.xo + m0 * K_out;
  for (int64_t c = 0; c < K_out; c++) {
    __m256 owv[NV];
    for (int j = 0; j < NV; j++) owv[j] = _mm256_loadu_ps(ow + (j * K_out + c) * 8);
    for (int i = 0; i < MT; i++) {
      const __m256 xb = _mm256_set1_ps(xo[i * K_out + c]);
      for (int j = 0; j < NV; j++) v[i][j] = _mm256_fmadd_ps(xb, owv[j], v[i][j]);
    }
  }
  for (int j = 0; j < NV; j++) {
    const int64_t n = n0 + 8 * j;
    const __m256 b = p.bias ? load_cols(p.bias, n, N) : _mm256_setzero_ps();
    for (int i = 0; i < MT; i++) {
      if (p.bias) v[i][j] = _mm256_add_ps(v[i][j], b);
      if (p.best) {  // the greedy head: fold into this thread's best, write nothing
        lane_best_update(p.best[at::get_thread_num() * p.M + m0 + i], j & 1, v[i][j], n, N,
                         n + 8 > N);
        continue;
      }
      float* yr = p.y + (m0 + i) * N;
      if (n + 8 <= N)
        _mm256_storeu_ps(yr + n, v[i][j]);
      else
        _mm256_maskstore_ps(yr + n, lane_mask(n, N), v[i][j]);
    }
  }
}

// `rows` (1 .. 5) rows from m0 against NV panels from n0.
template <int NV>
inline void int8_tile_rows(const Int8Problem& p, int rows, int64_t m0, int64_t n0) {
  switch (rows) {
    case 5: int8_tile<5, NV>(p, m0, n0); break;
    case 4: int8_tile<4, NV>(p, m0, n0); break;
    case 3: int8_tile<3, NV>(p, m0, n0); break;
    case 2: int8_tile<2, NV>(p, m0, n0); break;
    case 1: int8_tile<1, NV>(p, m0, n0); break;
    default: break;
  }
}

// Rows [m0, m1) x output channels [nb, ne) (nb % 8 == 0): panels (NV at a time, then one by
// one) outer, 5-row tiles inner.
//
// While the row tiles work on one panel group (from L1 after the first tile), the next group's
// weights are prefetched, a share before each tile. Without it the first tile of every group
// waited on memory (a decode step's weights are never in cache) while the others did not
// touch it; the fewer the rows, the more of the time that wait was. The group after the
// block's last is the same thread's next work item (for_each_work_item hands out adjacent
// column blocks), or past the weights, which a prefetch may touch harmlessly. One tile
// (M <= 5) gets none: a burst of them ahead of the only tile stalled it.
template <int NV>
void int8_block(const Int8Problem& p, int64_t m0, int64_t m1, int64_t nb, int64_t ne) {
  const int64_t group_bytes = NV * p.K4 * 8, tiles = (m1 - m0 + 4) / 5;
  const int64_t share = tiles > 1 ? (group_bytes / 64 + tiles - 1) / tiles * 64 : 0;
  int64_t n = nb;
  for (; n + 8 * (NV - 1) < ne; n += 8 * NV) {
    const char* next = reinterpret_cast<const char*>(p.w + (n / 8 + NV) * p.K4 * 8);
    int64_t fetched = 0;
    for (int64_t m = m0; m < m1; m += 5) {
      for (const int64_t end = std::min(fetched + share, group_bytes); fetched < end;
           fetched += 64)
        _mm_prefetch(next + fetched, _MM_HINT_T0);
      int8_tile_rows<NV>(p, static_cast<int>(std::min<int64_t>(5, m1 - m)), m, n);
    }
  }
  for (; n < ne; n += 8)
    for (int64_t m = m0; m < m1; m += 5)
      int8_tile_rows<1>(p, static_cast<int>(std::min<int64_t>(5, m1 - m)), m, n);
}

// Quantize values (gathered through idx) to uint8 q + 128 with scale max |x| / 127, padding
// with zeros (128) up to `padded`; returns the scale. `g` is scratch for `count` floats.
// idx is sorted (the main channels, the outliers left out), so most runs of 8 are contiguous
// and read with one load; the rest are gathered one by one. Vector and scalar paths compute
// the same values: max is exact, and x * inv rounded to nearest even (vcvtps2dq in the
// default rounding mode) is std::nearbyint's result. |x * inv| <= 127, so q + 128 fits a
// byte and the saturating packs change nothing. (Vector code: a scalar version took a
// noticeable share of a long prefill's linear.)
inline float quantize_group(const float* xr, const int64_t* idx, int64_t count, int64_t padded,
                            uint8_t* out, float* g) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 amax8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    __m256 v;
    if (idx[j + 7] - idx[j] == 7) {
      v = _mm256_loadu_ps(xr + idx[j]);
    } else {
      v = _mm256_setr_ps(xr[idx[j]], xr[idx[j + 1]], xr[idx[j + 2]], xr[idx[j + 3]],
                         xr[idx[j + 4]], xr[idx[j + 5]], xr[idx[j + 6]], xr[idx[j + 7]]);
    }
    _mm256_storeu_ps(g + j, v);
    amax8 = _mm256_max_ps(amax8, _mm256_and_ps(v, abs_mask));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, amax8);
  float amax = 0.f;
  for (int l = 0; l < 8; l++) amax = std::max(amax, lanes[l]);
  for (; j < count; j++) {
    g[j] = xr[idx[j]];
    amax = std::max(amax, std::fabs(g[j]));
  }
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  const float inv = 1.f / scale;
  const __m256 invv = _mm256_set1_ps(inv);
  const __m256i c128 = _mm256_set1_epi32(128);
  // packs/packus interleave the 128-bit lanes; this puts the 32 bytes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto q = [&](int64_t i) {
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(g + i), invv);
    return _mm256_add_epi32(_mm256_cvtps_epi32(scaled), c128);
  };
  for (j = 0; j + 32 <= count; j += 32) {
    const __m256i lo = _mm256_packs_epi32(q(j), q(j + 8));
    const __m256i hi = _mm256_packs_epi32(q(j + 16), q(j + 24));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        _mm256_permutevar8x32_epi32(_mm256_packus_epi16(lo, hi), order));
  }
  for (; j < count; j++)
    out[j] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(g[j] * inv)) + 128);
  for (; j < padded; j++) out[j] = 128;
  return scale;
}

// int8_linear's work: y (or, with `best`, each thread's running argmax per row) from x.
void int8_run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
              const at::Tensor& w_colsum, const at::Tensor& main_idx,
              const at::Tensor& outlier_idx, const at::Tensor& outlier_w,
              const c10::optional<at::Tensor>& bias, float* y, LaneBest* best) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "int8_linear: x must be a contiguous 2-D float32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.numel();
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.is_contiguous() &&
                  w.size(0) == (N + 7) / 8 && w.size(2) == 8 && w.size(3) == 4,
              "int8_linear: w must be contiguous int8 [ceil(N / 8), K4 / 4, 8, 4] (packed)");
  const int64_t K4 = w.size(1) * 4;
  const int64_t K_main = main_idx.numel(), K_out = outlier_idx.numel();
  TORCH_CHECK(K_main + K_out == K && K_main <= K4, "int8_linear: channel split mismatch");
  TORCH_CHECK(w_colsum.numel() == N && w_scale.scalar_type() == at::kFloat &&
                  w_colsum.scalar_type() == at::kInt,
              "int8_linear: w_scale (float32) and w_colsum (int32) must have N entries");
  TORCH_CHECK(outlier_w.numel() == (N + 7) / 8 * K_out * 8 &&
                  outlier_w.scalar_type() == at::kFloat && outlier_w.is_contiguous(),
              "int8_linear: outlier_w must be float32 [ceil(N / 8), num_outliers, 8]");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == N && bias->scalar_type() == at::kFloat),
              "int8_linear: bias must be float32 [N]");
  if (M == 0 || N == 0) return;
  auto a = at::empty({M, K4}, x.options().dtype(at::kByte));
  auto x_out = at::empty({M, std::max<int64_t>(K_out, 1)}, x.options());
  auto row_scale = at::empty({M}, x.options());

  const float* xp = x.data_ptr<float>();
  uint8_t* ap = a.data_ptr<uint8_t>();
  float* xop = x_out.data_ptr<float>();
  float* sp = row_scale.data_ptr<float>();
  const int64_t* mi = main_idx.data_ptr<int64_t>();
  const int64_t* oi = outlier_idx.data_ptr<int64_t>();

  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> gathered(static_cast<size_t>(std::max<int64_t>(K_main, 1)));
    for (int64_t m = r0; m < r1; m++) {
      sp[m] = quantize_group(xp + m * K, mi, K_main, K4, ap + m * K4, gathered.data());
      for (int64_t j = 0; j < K_out; j++) xop[m * K_out + j] = xp[m * K + oi[j]];
    }
  });

  const Int8Problem p{ap, K4, w.data_ptr<int8_t>(), sp, xop, K_out,
                      outlier_w.data_ptr<float>(), w_colsum.data_ptr<int32_t>(),
                      w_scale.data_ptr<float>(),
                      bias.has_value() ? bias->data_ptr<float>() : nullptr,
                      y, N, best, M};

  // Blocks of 1-2 rows take 4 panels per tile (3 x 4 and 4 x 4 would not fit AVX2's 16
  // registers); with VNNI's 32 every block does. Work items: shared.h.
  for_each_work_item(M, N, [&](int64_t mb, int64_t me, int64_t nb, int64_t ne) {
    if (me - mb > 2 && !SHOAL_VNNI)
      int8_block<2>(p, mb, me, nb, ne);
    else
      int8_block<4>(p, mb, me, nb, ne);
  });
}

}  // namespace

// y [M, N] = x W^T (+ bias) for x float32 [M, K] and a weight packed as the opening comment
// says: w [ceil(N / 8), K4 / 4, 8, 4] int8, w_scale float32 [N], w_colsum int32 [N], the main
// input channels (int64, ascending) and the outlier ones (int64; together 0 .. K - 1), the
// outliers' float32 weights [ceil(N / 8), num_outliers, 8].
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const at::Tensor& w_colsum, const at::Tensor& main_idx,
                       const at::Tensor& outlier_idx, const at::Tensor& outlier_w,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "int8_linear: x must be a contiguous 2-D float32 tensor");
  auto y = at::empty({x.size(0), w_scale.numel()}, x.options());
  int8_run(x, w, w_scale, w_colsum, main_idx, outlier_idx, outlier_w, bias, y.data_ptr<float>(),
           nullptr);
  return y;
}

// The greedy int8 LM head: (argmax ids int64 [M], max logits float32 [M]) of
// int8_linear(...) without writing its [M, N] output (at 16 rows the default model's 49152 x
// 16 float32 logits are 3 MB written and read back by torch.argmax). The logits are the very
// values int8_linear computes, so the ids are `int8_linear(...).argmax(-1)`'s (ties to the
// lowest id), NaN aside: a NaN logit is never picked.
std::vector<at::Tensor> int8_linear_argmax(const at::Tensor& x, const at::Tensor& w,
                                           const at::Tensor& w_scale,
                                           const at::Tensor& w_colsum,
                                           const at::Tensor& main_idx,
                                           const at::Tensor& outlier_idx,
                                           const at::Tensor& outlier_w,
                                           const c10::optional<at::Tensor>& bias) {
  const int64_t M = x.dim() == 2 ? x.size(0) : 0, threads = at::get_num_threads();
  std::vector<LaneBest> best(static_cast<size_t>(std::max<int64_t>(threads * M, 1)));
  reset_lane_best(best.data(), threads * M);
  int8_run(x, w, w_scale, w_colsum, main_idx, outlier_idx, outlier_w, bias, nullptr,
           best.data());
  return best_of_rows(best.data(), threads, M, x.options());
}

}  // namespace shoal_native
