// shoal's native CPU kernels, compiled when shoal is installed (setup.py) once per
// instruction-set level of shoal/native/variants.py (AVX2; AVX-512 VNNI; AVX-512 VNNI + BF16);
// shoal/native/__init__.py loads the best level the CPU runs.
//
// int8_linear: y = x W^T for int8 weights with per-row int8 activations, exact int32 sums.
// paged_decode_attention: one query token per request against its paged KV cache, read in
// place through the block table (no gather into a padded copy).
//
// Both are batch invariant by construction: every output element is computed by the same
// sequence of operations whatever other rows share the call and however the work is split
// between threads (int32 sums are exact; float epilogues run in a fixed order per element).

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "shared.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// q4.cpp: GGUF 4-bit linears (`--quantization gguf`).
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, int64_t n_out,
                     const c10::optional<at::Tensor>& bias);
void register_q4(pybind11::module_& m);

namespace {

// ---------------------------------------------------------------------------------------------
// int8 linear
//
// Activations: each row's main channels are quantized symmetrically, scale = max |x| / 127,
// and stored as uint8 (q + 128) so that vpmaddubsw (uint8 x int8 -> pairs summed in int16)
// can multiply them. Weights have 7 bits (|w| <= 63): 2 x 255 x 63 < 32768, so the int16 pair
// sums never saturate. The +128 offset is removed with the weight row's precomputed sum:
//     sum_k (q_k + 128) w_k = sum_k q_k w_k + 128 * colsum.
// A few outlier input channels (chosen at load) skip quantization: they are added in float32
// in the epilogue (a second int8 group with its own scales was faster by a few percent but
// lost 3-4 points of top-1 agreement with float32: the outliers differ from each other by
// 10-100x too).
//
// Weight layout (packed once at load by shoal/model/llama.py's _quantize_columns):
// [ceil(N / 8)][K4 / 4][8][4] int8, K4 = the main channels rounded up to a multiple of 4, zero
// padded in both directions. A "panel" is 8 output channels over all of K4; within it, one
// 32-byte load holds 4 consecutive input channels of each of the 8 outputs. Broadcasting a
// row's 4 activation bytes (vpbroadcastd) against that load, vpmaddubsw + vpmaddwd(ones)
// gives the 8 outputs' partial sums over those 4 channels in 8 int32 lanes: accumulators are
// 8 output channels wide and need no horizontal sum at the end (an [N, K] layout, one
// accumulator per (row, output channel), spent ~10% of the time in horizontal sums and could
// only keep 2 output channels per tile in registers).
//
// Register tile: 5 rows x 2 panels (16 output channels) = 10 int32 accumulators, plus the two
// weight vectors, the broadcast activations, the ones and a temporary: all 16 ymm registers
// (6 x 2 spills; 4 x 2, 3 x 4 and 4 x 3 measured 10-25% slower). Per 4 input channels that
// is 2 loads + 5 broadcasts for 10 x (vpmaddubsw, vpmaddwd, vpaddd): the two multiplies per
// 32 products are what bounds it (they share 2 ports). 1 or 2 rows take 4 panels
// (32 output channels) per tile, so the 1-row (decode) case loads 4 weight vectors per
// broadcast; 3 and 4 rows keep 2 panels. The 5 x 2 main loop is inline assembly
// (int8_main_5x2): GCC kept half of the intrinsic version's accumulators on the stack, a store
// and a reload each per 4 input channels; in registers the kernel runs 1.1-1.5x faster
// (~105-165 GOP/s per core on the layer shapes at 64 and 2048 rows; the two multiply ports allow
// ~175 at this clock) with bit-identical results.
//
// Blocking: a work item is 40 rows x 128 output channels (32 when all rows fit one block:
// more items to share between threads). Inside it, panels outer, rows inner: the 40 rows'
// activations (23 KB at K = 576) and the current 16-channel weight panel pair (9 KB) stay in
// L1 while the panels stream from L2 (measured: 40 x 128 was ~15% faster than 128 x 64 rows
// inner, whose 72 KB of activations came from L2 on every panel).
//
// Epilogue fused into the tile: the int32 sums go straight from registers to float (sum -
// 128 colsum, times the row scale, times the weight scale), then the outlier channels are
// added in input order with one FMA each (the outlier weight vector is loaded once for all of
// the tile's rows), then the bias. Every output element gets exactly the same operations in
// the same order whatever the tile, thread split or batch: results do not depend on them.

// ---------------------------------------------------------------------------------------------
// Running argmax of logit rows (the greedy LM heads: lm_head_argmax, int8_linear_argmax)
//
// A row's best is kept per lane: 16 values and their vocabulary ids, updated 8 logits at a
// time; a lane keeps the lowest id of its maximum. NaN logits are never picked.

struct LaneBest {
  __m256 val[2];
  __m256i idx[2];
};

// Fold 8 logits of vocabulary ids id0..id0+7 into half h of a row's running best.
inline void lane_best_update(LaneBest& best, int h, __m256 v, int64_t id0, int64_t vocab,
                             bool tail) {
  const __m256i ids = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32(static_cast<int>(id0)));
  if (tail) {
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(vocab)), ids);
    v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(valid));
  }
  // Greater, or equal with a lower id: a lane keeps the lowest id of its maximum whatever
  // order its ids come in (work items may be taken out of order: shared.h).
  const __m256 better = _mm256_or_ps(
      _mm256_cmp_ps(v, best.val[h], _CMP_GT_OQ),
      _mm256_and_ps(_mm256_cmp_ps(v, best.val[h], _CMP_EQ_OQ),
                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(best.idx[h], ids))));
  best.val[h] = _mm256_blendv_ps(best.val[h], v, better);
  best.idx[h] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best.idx[h]),
                                                     _mm256_castsi256_ps(ids), better));
}

// (ids int64 [M], max logit float32 [M]) from `chunks` x M running bests ([chunk][row]), each
// chunk over its own vocabulary ids. Equal values go to the lowest id, within a chunk's lanes
// and across chunks (torch.argmax's rule); all -inf or NaN: id 0.
std::vector<at::Tensor> best_of_rows(const LaneBest* best, int64_t chunks, int64_t M,
                                     const at::TensorOptions& options) {
  at::Tensor ids = at::empty({M}, options.dtype(at::kLong));
  at::Tensor vals = at::empty({M}, options.dtype(at::kFloat));
  int64_t* idp = ids.data_ptr<int64_t>();
  float* vp = vals.data_ptr<float>();
  for (int64_t m = 0; m < M; m++) {
    float bv = -INFINITY;
    int64_t bi = 0;
    for (int64_t c = 0; c < chunks; c++) {
      alignas(32) float v[16];
      alignas(32) int32_t id[16];
      const LaneBest& b = best[c * M + m];
      _mm256_store_ps(v, b.val[0]);
      _mm256_store_ps(v + 8, b.val[1]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(id), b.idx[0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(id + 8), b.idx[1]);
      float cv = -INFINITY;
      int64_t ci = INT64_MAX;
      for (int j = 0; j < 16; j++)
        if (v[j] > cv || (v[j] == cv && id[j] < ci)) {
          cv = v[j];
          ci = id[j];
        }
      if (cv > bv || (cv == bv && ci < bi)) {
        bv = cv;
        bi = ci;
      }
    }
    idp[m] = bi;
    vp[m] = bv;
  }
  return {ids, vals};
}

inline void reset_lane_best(LaneBest* best, int64_t count) {
  for (int64_t i = 0; i < count; i++)
    for (int h = 0; h < 2; h++) {
      best[i].val[h] = _mm256_set1_ps(-INFINITY);
      best[i].idx[h] = _mm256_setzero_si256();
    }
}

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

using shoal_native::lane_mask;

inline __m256 load_cols(const float* p, int64_t n, int64_t N) {
  return n + 8 <= N ? _mm256_loadu_ps(p + n) : _mm256_maskload_ps(p + n, lane_mask(n, N));
}

inline __m256i load_cols(const int32_t* p, int64_t n, int64_t N) {
  return n + 8 <= N ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + n))
                    : _mm256_maskload_epi32(p + n, lane_mask(n, N));
}

// The 5-row x 2-panel main loop (why in assembly: the overview above). The ten accumulators
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
// waited on memory (a decode step's weights are never in cache) and the others did not touch
// it: at 16 rows the layer linears ran 1.10-1.17x faster with it (interleaved A/B, weights
// cold), at 64 rows 1.02-1.04x. The group after the block's last is the same thread's next
// work item (for_each_work_item hands out adjacent column blocks), or past the weights, which
// a prefetch may touch harmlessly. One tile (M <= 5) gets none: a burst of them ahead of the
// only tile stalled it.
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
// byte and the saturating packs change nothing. (The scalar version of this took ~2 ms of a
// 2048 x 576 call's ~15, ~5 ms at K = 1536.)
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
void int8_run(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& w_scale,
              const torch::Tensor& w_colsum, const torch::Tensor& main_idx,
              const torch::Tensor& outlier_idx, const torch::Tensor& outlier_w,
              const c10::optional<torch::Tensor>& bias, float* y, LaneBest* best) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "int8_linear: x must be a contiguous 2-D float32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w_scale.numel();
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == torch::kChar && w.is_contiguous() &&
                  w.size(0) == (N + 7) / 8 && w.size(2) == 8 && w.size(3) == 4,
              "int8_linear: w must be contiguous int8 [ceil(N / 8), K4 / 4, 8, 4] (packed)");
  const int64_t K4 = w.size(1) * 4;
  const int64_t K_main = main_idx.numel(), K_out = outlier_idx.numel();
  TORCH_CHECK(K_main + K_out == K && K_main <= K4, "int8_linear: channel split mismatch");
  TORCH_CHECK(w_colsum.numel() == N && w_scale.scalar_type() == torch::kFloat &&
                  w_colsum.scalar_type() == torch::kInt,
              "int8_linear: w_scale (float32) and w_colsum (int32) must have N entries");
  TORCH_CHECK(outlier_w.numel() == (N + 7) / 8 * K_out * 8 &&
                  outlier_w.scalar_type() == torch::kFloat && outlier_w.is_contiguous(),
              "int8_linear: outlier_w must be float32 [ceil(N / 8), num_outliers, 8]");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == N && bias->scalar_type() == torch::kFloat),
              "int8_linear: bias must be float32 [N]");
  if (M == 0 || N == 0) return;
  auto a = torch::empty({M, K4}, x.options().dtype(torch::kByte));
  auto x_out = torch::empty({M, std::max<int64_t>(K_out, 1)}, x.options());
  auto row_scale = torch::empty({M}, x.options());

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
  shoal_native::for_each_work_item(M, N, [&](int64_t mb, int64_t me, int64_t nb, int64_t ne) {
    if (me - mb > 2 && !SHOAL_VNNI)
      int8_block<2>(p, mb, me, nb, ne);
    else
      int8_block<4>(p, mb, me, nb, ne);
  });
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& w,
                          const torch::Tensor& w_scale, const torch::Tensor& w_colsum,
                          const torch::Tensor& main_idx, const torch::Tensor& outlier_idx,
                          const torch::Tensor& outlier_w,
                          const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "int8_linear: x must be a contiguous 2-D float32 tensor");
  auto y = torch::empty({x.size(0), w_scale.numel()}, x.options());
  int8_run(x, w, w_scale, w_colsum, main_idx, outlier_idx, outlier_w, bias, y.data_ptr<float>(),
           nullptr);
  return y;
}

// The greedy int8 LM head: (argmax ids int64 [M], max logits float32 [M]) of
// int8_linear(...) without writing its [M, N] output (at 16 rows the default model's 49152 x
// 16 float32 logits are 3 MB written and read back by torch.argmax). The logits are the very
// values int8_linear computes, so the ids are `int8_linear(...).argmax(-1)`'s (ties to the
// lowest id), NaN aside: a NaN logit is never picked.
std::vector<torch::Tensor> int8_linear_argmax(
    const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& w_scale,
    const torch::Tensor& w_colsum, const torch::Tensor& main_idx,
    const torch::Tensor& outlier_idx, const torch::Tensor& outlier_w,
    const c10::optional<torch::Tensor>& bias) {
  const int64_t M = x.dim() == 2 ? x.size(0) : 0, threads = at::get_num_threads();
  std::vector<LaneBest> best(static_cast<size_t>(std::max<int64_t>(threads * M, 1)));
  reset_lane_best(best.data(), threads * M);
  int8_run(x, w, w_scale, w_colsum, main_idx, outlier_idx, outlier_w, bias, nullptr,
           best.data());
  return best_of_rows(best.data(), threads, M, x.options());
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention

// exp for x <= 0 (scores minus their max): 2^n * p(r), r = x - n ln 2, degree-6 polynomial;
// relative error ~2e-7 on [-87, 0], 0 below.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 too_small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
  // r = x - n * ln2 in two parts (Cody-Waite) for accuracy.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(too_small, result);
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// KV cache elements: float32, or float16 stored as uint16 (`--kv-cache-dtype float16`) and
// widened by F16C on load. Everything after the load is float32 either way.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return _cvtsh_ss(*p); }

template <typename T>
inline float dot(const float* a, const T* b, int64_t d) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= d; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  float s = hsum_ps(_mm256_add_ps(acc0, acc1));
  // Explicit fma in the scalar tails: left as `s += a * b`, GCC's contraction and its
  // vectorizer choose per element type and per target (with AVX-512 it split the float tail
  // into a vector multiply and scalar adds but fused the float16 one), and the two cache
  // dtypes stopped giving the same bits.
  for (; i < d; i++) s = std::fma(a[i], load1(b + i), s);
  return s;
}

// out[i] += p * v[i]
template <typename T>
inline void axpy(float* out, float p, const T* v, int64_t d) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(out + i)));
  for (; i < d; i++) out[i] = std::fma(p, load1(v + i), out[i]);
}

// acc[c][j] = 0 for the C x 4 accumulators of the GQA attention tiles (fully unrolled, so
// the array stays in registers).
template <int C>
inline void zero_accumulators(__m256 (&acc)[C][4]) {
#pragma GCC unroll 4
  for (int c = 0; c < C; c++)
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) acc[c][j] = _mm256_setzero_ps();
}

// Scores of C query heads that share one KV head against 4 keys: each key vector is loaded
// once for the C heads (GQA: the keys are read once per KV head, not once per query head),
// 4C independent FMA chains over head_dim (d % 8 == 0), then per head a 3-hadd tree turns its
// 4 accumulators into 4 sums. out[c][0..3] = q[c] . keys[0..3] * scale.
template <int C, typename T>
inline void gqa_scores4(const float* const* q, const T* const* keys, int64_t d, float scale,
                        float* const* out) {
  __m256 acc[C][4];
  zero_accumulators<C>(acc);
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 k0 = load8(keys[0] + i), k1 = load8(keys[1] + i);
    const __m256 k2 = load8(keys[2] + i), k3 = load8(keys[3] + i);
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) {
      const __m256 qv = _mm256_loadu_ps(q[c] + i);
      acc[c][0] = _mm256_fmadd_ps(qv, k0, acc[c][0]);
      acc[c][1] = _mm256_fmadd_ps(qv, k1, acc[c][1]);
      acc[c][2] = _mm256_fmadd_ps(qv, k2, acc[c][2]);
      acc[c][3] = _mm256_fmadd_ps(qv, k3, acc[c][3]);
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < C; c++) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(acc[c][0], acc[c][1]),
                                    _mm256_hadd_ps(acc[c][2], acc[c][3]));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
    _mm_storeu_ps(out[c], _mm_mul_ps(sums, _mm_set1_ps(scale)));
  }
}

// The value pass for C query heads sharing one KV head, one 32-wide slice of head_dim, over
// keys [t0, t1): out[c][0..32) += sum_t p[c][t] values[t][0..32) (t0 == 0: out is written,
// not read), each value vector loaded once for the C heads and the sums held in registers.
// Splitting [0, L) into chunks gives the same bits as one pass: each sum is one FMA chain in
// key order, and a chunk only parks it in `out` between two keys. Registers: 4C sums, C
// weights and one value vector (16 for C = 3, so none is spilled to the stack).
template <int C, typename T>
inline void gqa_weighted_sum32(const float* const* p, const T* const* values, int64_t t0,
                               int64_t t1, float* const* out) {
  __m256 acc[C][4];
  if (t0 == 0) {
    zero_accumulators<C>(acc);
  } else {
#pragma GCC unroll 4
    for (int c = 0; c < C; c++)
#pragma GCC unroll 4
      for (int j = 0; j < 4; j++) acc[c][j] = _mm256_loadu_ps(out[c] + 8 * j);
  }
  for (int64_t t = t0; t < t1; t++) {
    __m256 pv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) pv[c] = _mm256_set1_ps(p[c][t]);
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
      const __m256 v = load8(values[t] + 8 * j);
#pragma GCC unroll 4
      for (int c = 0; c < C; c++) acc[c][j] = _mm256_fmadd_ps(pv[c], v, acc[c][j]);
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < C; c++)
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) _mm256_storeu_ps(out[c] + 8 * j, acc[c][j]);
}

// Ask for one token's cache row ([kv_heads, head_dim]) ahead of its use: a sequence's blocks
// lie anywhere in the cache, so the hardware prefetcher cannot see the next block coming.
template <typename T>
inline void prefetch_row(const T* row, int64_t elements) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = elements * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// The same into L2 only (see kFar).
template <typename T>
inline void prefetch_row_l2(const T* row, int64_t elements) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = elements * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

// Keys ahead of the scores pass that are prefetched into L1, keys per chunk of the value pass,
// and keys ahead whose key and value rows are prefetched into L2. At 16 requests x 192 keys
// a step's keys and values (~70 MB) come from memory, and with only the L1 prefetches the
// kernel read them at ~8 GB/s: its value pass waited on every chunk's first row (30% of
// its samples on that load) and the next request's first keys were never asked for. The
// L2 prefetches (values during the scores pass, and the start of the thread's next request
// at the end of each) made it 1.18-1.22x faster at 16 and 64 requests (interleaved A/B,
// bit-identical), 1.09x for one 4,000-token request; 24 keys ahead beat 48 (1.12-1.14x) and
// 96 (1.10x). When a call's keys and values fit in ~1 MB they stay in cache from one step to
// the next, and the extra prefetches only cost (one 300-token request: 0.90x), so they are
// skipped there.
constexpr int64_t kAhead = 8, kChunk = 16, kFar = 24;

template <typename T>
torch::Tensor paged_decode_attention_impl(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                     const torch::Tensor& block_table,
                                     const torch::Tensor& seq_lens, double scale,
                                     int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.stride(2) == 1,
              "paged_decode_attention: q must be float32 [n, heads, head_dim], last dim dense");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous(),
              "paged_decode_attention: kv_cache must be contiguous [2, blocks, block_size, "
              "kv_heads, head_dim]");
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && block_table.stride(1) == 1,
              "paged_decode_attention: block_table must be int64 with dense rows");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kLong && seq_lens.is_contiguous(),
              "paged_decode_attention: seq_lens must be contiguous int64");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = kv_cache.size(1), BS = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && H % KVH == 0, "paged_decode_attention: head shapes");
  const int64_t G = H / KVH;
  auto out = torch::empty({n, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const T* kp = reinterpret_cast<const T*>(kv_cache.data_ptr());
  const T* vp = kp + num_blocks * BS * KVH * D;
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t q_s0 = q.stride(0), q_s1 = q.stride(1), bt_s0 = block_table.stride(0);
  const int64_t token_stride = KVH * D, block_stride = BS * KVH * D;
  const float fscale = static_cast<float>(scale);

  // Far prefetches only when this call's keys and values are too many to stay in cache from
  // one step to the next (one request at a few hundred tokens: they do, and the extra
  // prefetches cost 10%).
  int64_t total_keys = 0;
  for (int64_t r = 0; r < n; r++) total_keys += lens[r];
  const bool far = total_keys * token_stride * static_cast<int64_t>(sizeof(T)) * 2 > (1 << 20);

  // One request per work item. Its keys are read token by token with every KV head at once:
  // a block holds its tokens' [kv_heads, head_dim] rows back to back, so each block is one
  // contiguous run of memory that the hardware prefetcher can follow (per-head passes jump
  // by kv_heads x head_dim and were latency-bound, 10x slower).
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> rows;
    std::vector<const T*> values;
    for (int64_t r = begin; r < end; r++) {
      const int64_t len = lens[r];
      const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
      const int64_t L = len - start;
      const int64_t* table = bt + r * bt_s0;
      const float* qr = qp + r * q_s0;
      scores.resize(static_cast<size_t>(H * std::max<int64_t>(L, 1)));
      // Each token's [kv_heads, head_dim] row in the cache, looked up once (block by block:
      // no division per token).
      rows.resize(static_cast<size_t>(std::max<int64_t>(L, 1)));
      for (int64_t t = 0, pos = start; t < L;) {
        const int64_t block = table[pos / BS] * block_stride;
        for (int64_t off = pos % BS; off < BS && t < L; off++, t++, pos++)
          rows[t] = block + off * token_stride;
      }
      // Scores 4 keys at a time for up to 3 query heads of a KV head together (each key
      // vector loaded once for them), then the remaining keys one by one.
      int64_t t0 = 0;
      if (D % 8 == 0) {
        for (int64_t t = 0; t < std::min<int64_t>(far ? kFar : kAhead, L); t++) {
          if (t < kAhead) prefetch_row(kp + rows[t], token_stride);
          else prefetch_row_l2(kp + rows[t], token_stride);
          if (far) prefetch_row_l2(vp + rows[t], token_stride);
        }
        for (; t0 + 4 <= L; t0 += 4) {
          for (int64_t t = t0 + kAhead; t < std::min<int64_t>(t0 + kAhead + 4, L); t++)
            prefetch_row(kp + rows[t], token_stride);
          for (int64_t t = t0 + kFar; far && t < t0 + kFar + 4; t++) {
            if (t < L) {
              prefetch_row_l2(kp + rows[t], token_stride);
              prefetch_row_l2(vp + rows[t], token_stride);
            } else if (r + 1 < end) {  // the start of this thread's next request
              const int64_t u = t - L, next_len = lens[r + 1];
              const int64_t next_start =
                  sliding_window > 0 ? std::max<int64_t>(0, next_len - sliding_window) : 0;
              if (next_start + u < next_len) {
                const int64_t pos = next_start + u;
                const int64_t row = bt[(r + 1) * bt_s0 + pos / BS] * block_stride +
                                    (pos % BS) * token_stride;
                prefetch_row_l2(kp + row, token_stride);
                prefetch_row_l2(vp + row, token_stride);
              }
            }
          }
          for (int64_t h0 = 0; h0 < H; h0 += std::min<int64_t>(3, G - h0 % G)) {
            const int64_t c = std::min<int64_t>(3, G - h0 % G);
            const T* keys[4];
            for (int j = 0; j < 4; j++) keys[j] = kp + rows[t0 + j] + (h0 / G) * D;
            const float* qs[3];
            float* outs[3];
            for (int64_t i = 0; i < c; i++) {
              qs[i] = qr + (h0 + i) * q_s1;
              outs[i] = scores.data() + (h0 + i) * L + t0;
            }
            if (c == 3) gqa_scores4<3>(qs, keys, D, fscale, outs);
            else if (c == 2) gqa_scores4<2>(qs, keys, D, fscale, outs);
            else gqa_scores4<1>(qs, keys, D, fscale, outs);
          }
        }
      }
      // The first values, fetched while the softmax runs.
      for (int64_t t = 0; t < std::min<int64_t>(kChunk, L); t++)
        prefetch_row(vp + rows[t], token_stride);
      for (int64_t t = t0; t < L; t++)
        for (int64_t h = 0; h < H; h++)
          scores[h * L + t] = dot(qr + h * q_s1, kp + rows[t] + (h / G) * D, D) * fscale;
      for (int64_t h = 0; h < H; h++) {
        float* s = scores.data() + h * L;
        float mx = -INFINITY;
        {
          __m256 m8 = _mm256_set1_ps(-INFINITY);
          int64_t t = 0;
          for (; t + 8 <= L; t += 8) m8 = _mm256_max_ps(_mm256_loadu_ps(s + t), m8);
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, m8);
          for (int j = 0; j < 8; j++) mx = std::max(mx, lanes[j]);
          for (; t < L; t++) mx = std::max(mx, s[t]);
        }
        const __m256 mv = _mm256_set1_ps(mx);
        __m256 sumv = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= L; t += 8) {
          const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
          _mm256_storeu_ps(s + t, e);
          sumv = _mm256_add_ps(sumv, e);
        }
        float sum = hsum_ps(sumv);
        for (; t < L; t++) {
          s[t] = std::exp(s[t] - mx);
          sum += s[t];
        }
        // Normalise the weights now: the value pass is then a plain weighted sum.
        const float inv = 1.f / sum;
        for (t = 0; t < L; t++) s[t] *= inv;
      }
      float* o = op + r * H * D;
      if (D % 32 == 0) {
        // Per KV head, up to 3 of its query heads and a 32-wide slice of head_dim at a time:
        // each value vector is loaded once for them, the sums stay in registers.
        // Keys in chunks of kChunk: a chunk's cache rows are read by every head group and
        // slice while they are in L1, and the next chunk's are prefetched meanwhile (1.4x
        // for a float16 cache at batch 64). With L == 0 the output is zeros, as before.
        values.resize(static_cast<size_t>(std::max<int64_t>(L, 1)));
        if (L == 0) std::fill(o, o + H * D, 0.f);
        for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
          const int64_t t1 = std::min<int64_t>(t0 + kChunk, L);
          for (int64_t t = t1; t < std::min<int64_t>(t1 + kChunk, L); t++)
            prefetch_row(vp + rows[t], token_stride);
          for (int64_t h0 = 0; h0 < H; h0 += std::min<int64_t>(3, G - h0 % G)) {
            const int64_t c = std::min<int64_t>(3, G - h0 % G);
            for (int64_t d0 = 0; d0 < D; d0 += 32) {
              for (int64_t t = t0; t < t1; t++) values[t] = vp + rows[t] + (h0 / G) * D + d0;
              const float* ps[3];
              float* outs[3];
              for (int64_t i = 0; i < c; i++) {
                ps[i] = scores.data() + (h0 + i) * L;
                outs[i] = o + (h0 + i) * D + d0;
              }
              if (c == 3) gqa_weighted_sum32<3>(ps, values.data(), t0, t1, outs);
              else if (c == 2) gqa_weighted_sum32<2>(ps, values.data(), t0, t1, outs);
              else gqa_weighted_sum32<1>(ps, values.data(), t0, t1, outs);
            }
          }
        }
      } else {
        std::fill(o, o + H * D, 0.f);
        for (int64_t u = 0; u < L; u++)
          for (int64_t h = 0; h < H; h++)
            axpy(o + h * D, scores[h * L + u], vp + rows[u] + (h / G) * D, D);
      }
    }
  });
  return out;
}

// float32 or float16 caches (`--kv-cache-dtype`); float32 queries and outputs either way.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& kv_cache,
                                     const torch::Tensor& block_table,
                                     const torch::Tensor& seq_lens, double scale,
                                     int64_t sliding_window) {
  if (kv_cache.scalar_type() == torch::kHalf)
    return paged_decode_attention_impl<uint16_t>(q, kv_cache, block_table, seq_lens, scale,
                                                 sliding_window);
  TORCH_CHECK(kv_cache.scalar_type() == torch::kFloat,
              "paged_decode_attention: kv_cache must be float32 or float16");
  return paged_decode_attention_impl<float>(q, kv_cache, block_table, seq_lens, scale,
                                            sliding_window);
}

// ---------------------------------------------------------------------------------------------
// Elementwise steps of a decoder layer: RMSNorm, SiLU(gate) * up, RoPE + the KV cache write
//
// Each was several ATen ops (RMSNorm 7: pow, mean, add, rsqrt, two muls, a copy; RoPE with
// the cache write 10), each a dispatch and a pass over memory: ~0.4 ms per layer at 64 rows,
// ~12 ms of a ~200 ms int8 decode step on one thread. Rows are independent and each element gets a fixed sequence
// of operations, so results do not depend on the batch or the thread split. RMSNorm and SiLU
// are not bit-identical to torch's (another summation order, another exp), so the Python
// layers call these same kernels whenever they run (shoal/model/llama.py); the RoPE rotation
// is the same three roundings as torch's (x1 c - x2 s: two products, one difference; FMA
// contraction is off for it), so it is bit-identical to apply_rope.

// out = x / sqrt(mean(x^2) + eps) * w, per row of [n, K]; transformers' order: (x * r) * w.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat && w_in.scalar_type() == torch::kFloat,
              "rms_norm: float32 only");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(w_in.numel() == K, "rms_norm: weight size ", w_in.numel(), " != ", K);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  auto out = torch::empty_like(x);
  const int64_t n = K ? x.numel() / K : 0;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float* xr = xp + r * K;
      float* orow = op + r * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= K; i += 16) {
        const __m256 u = _mm256_loadu_ps(xr + i), v = _mm256_loadu_ps(xr + i + 8);
        a0 = _mm256_fmadd_ps(u, u, a0);
        a1 = _mm256_fmadd_ps(v, v, a1);
      }
      for (; i + 8 <= K; i += 8) {
        const __m256 u = _mm256_loadu_ps(xr + i);
        a0 = _mm256_fmadd_ps(u, u, a0);
      }
      float ss = hsum_ps(_mm256_add_ps(a0, a1));
      for (; i < K; i++) ss = std::fma(xr[i], xr[i], ss);  // explicit: see dot()
      const float r_inv = 1.0f / std::sqrt(ss / static_cast<float>(K) + feps);
      const __m256 rv = _mm256_set1_ps(r_inv);
      i = 0;
      for (; i + 8 <= K; i += 8)
        _mm256_storeu_ps(orow + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), rv),
                                                 _mm256_loadu_ps(wp + i)));
      for (; i < K; i++) orow[i] = (xr[i] * r_inv) * wp[i];
    }
  });
  return out;
}

// [n, 2I] (gate | up) -> [n, I]: silu(gate) * up, silu(g) = g * sigmoid(g), the sigmoid from
// exp(-|g|) so the exponent never overflows.
at::Tensor silu_mul(const at::Tensor& gu_in) {
  TORCH_CHECK(gu_in.scalar_type() == torch::kFloat && gu_in.size(-1) % 2 == 0,
              "silu_mul: float32 [..., 2 I] expected");
  const at::Tensor gu = gu_in.contiguous();
  const int64_t I = gu.size(-1) / 2, n = I ? gu.numel() / (2 * I) : 0;
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = I;
  auto out = torch::empty(shape, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto silu1 = [](float g) {
    const float e = std::exp(-std::fabs(g));
    return g * (g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
  };
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)),
                   [&](int64_t begin, int64_t end) {
    const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t r = begin; r < end; r++) {
      const float* g = gp + r * 2 * I;
      const float* u = g + I;
      float* o = op + r * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_or_ps(gv, sign));  // exp(-|g|) in (0, 1]
        // 1 / (1 + e): the 12-bit reciprocal and one Newton step (~1e-7 relative), a third of
        // a vdivps' cost.
        const __m256 d = _mm256_add_ps(one, e);
        __m256 inv = _mm256_rcp_ps(d);
        inv = _mm256_mul_ps(inv, _mm256_fnmadd_ps(d, inv, two));
        const __m256 neg = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ);
        const __m256 sig = _mm256_blendv_ps(inv, _mm256_mul_ps(e, inv), neg);
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
      }
      for (; i < I; i++) o[i] = silu1(g[i]) * u[i];
    }
  });
  return out;
}

// RoPE (rotate-half) on `heads` consecutive heads of one row, in place: x1 c - x2 s and
// x2 c + x1 s with every product rounded, as torch computes them. Out of line with FMA
// contraction off: GCC would otherwise fuse a product into the difference (one rounding
// fewer), and the attribute would not reach the body inlined into parallel_for's lambda.
__attribute__((noinline, optimize("fp-contract=off")))
void rope_row(float* r, const float* c, const float* s, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; h++) {
    float* x1 = r + h * D;
    float* x2 = x1 + half;
    int64_t j = 0;
    for (; j + 8 <= half; j += 8) {
      const __m256 a = _mm256_loadu_ps(x1 + j), b = _mm256_loadu_ps(x2 + j);
      const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(s + j);
      const __m256 lo = _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv));
      const __m256 hi = _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv));
      _mm256_storeu_ps(x1 + j, lo);
      _mm256_storeu_ps(x2 + j, hi);
    }
    for (; j < half; j++) {
      const float a = x1[j], b = x2[j];
      x1[j] = a * c[j] - b * s[j];
      x2[j] = b * c[j] + a * s[j];
    }
  }
}

// float32 -> float16, round to nearest even (what torch's .to(torch.float16) does).
inline void store_half(uint16_t* out, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; i++) out[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}

// RoPE on the q and k heads of each row of qkv [n, (H + 2 KVH) D], in place, then this
// step's k and v rows copied into the paged cache at `slots` (the index_copy_ of write_kv).
// cos, sin: [n, 1, D / 2] (any row stride).
void rope_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                    at::Tensor& kv, const at::Tensor& slots, int64_t H, int64_t KVH, int64_t D) {
  TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == torch::kFloat,
              "rope_and_cache: qkv must be contiguous float32");
  TORCH_CHECK(D % 2 == 0 && cos.stride(-1) == 1 && sin.stride(-1) == 1,
              "rope_and_cache: cos/sin rows must be dense");
  TORCH_CHECK(kv.is_contiguous() && slots.scalar_type() == torch::kLong && slots.is_contiguous(),
              "rope_and_cache: contiguous cache and int64 slots expected");
  const int64_t n = qkv.size(0), W = qkv.size(1);
  TORCH_CHECK(W == (H + 2 * KVH) * D, "rope_and_cache: qkv width");
  const int64_t total_slots = kv.size(1) * kv.size(2), row = KVH * D;
  float* qp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  TORCH_CHECK(kv.scalar_type() == torch::kFloat || kv.scalar_type() == torch::kHalf,
              "rope_and_cache: the cache must be float32 or float16");
  const bool half = kv.scalar_type() == torch::kHalf;
  char* kc = static_cast<char*>(kv.data_ptr());
  const int64_t esize = half ? 2 : 4;
  char* vc = kc + total_slots * row * esize;
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; i++)
    TORCH_CHECK(sl[i] >= 0 && sl[i] < total_slots, "rope_and_cache: slot out of range");
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      float* r = qp + i * W;
      rope_row(r, cp + i * cs, sp + i * ss, H + KVH, D);
      if (half) {
        store_half(reinterpret_cast<uint16_t*>(kc) + sl[i] * row, r + H * D, row);
        store_half(reinterpret_cast<uint16_t*>(vc) + sl[i] * row, r + (H + KVH) * D, row);
      } else {
        std::memcpy(kc + sl[i] * row * esize, r + H * D, sizeof(float) * row);
        std::memcpy(vc + sl[i] * row * esize, r + (H + KVH) * D, sizeof(float) * row);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The decoder layers of a decode-only step, in one call
//
// At batch 1 a layer is ~35 small torch ops, and dispatching each from Python cost more than
// the arithmetic. This runs the same ops in the same order from C++ (ATen calls and the
// kernels above), so its results are bit-identical to shoal/model/llama.py's DecoderLayer
// (tested); only the Python overhead goes.

constexpr int64_t kLinearSlots = 7;  // int8: qweight, w_scale, w_colsum, main_idx,
                                     // outlier_idx, outlier_w, bias; float: weight, bias, -;
                                     // q4: packed, out_features, bias, -
constexpr int64_t kLayerSlots = 2 + 4 * kLinearSlots;

at::Tensor apply_linear(const at::Tensor& x, const std::vector<at::Tensor>& p, int64_t i) {
  if (p[i].scalar_type() == torch::kByte) {  // q4: packed, out_features ([1] int64), bias
    const c10::optional<at::Tensor> bias =
        p[i + 2].numel() ? c10::optional<at::Tensor>(p[i + 2]) : c10::nullopt;
    return q4_linear(x.contiguous(), p[i], *p[i + 1].data_ptr<int64_t>(), bias);
  }
  if (p[i].scalar_type() == torch::kChar) {
    const c10::optional<at::Tensor> bias =
        p[i + 6].numel() ? c10::optional<at::Tensor>(p[i + 6]) : c10::nullopt;
    return int8_linear(x.contiguous(), p[i], p[i + 1], p[i + 2], p[i + 3], p[i + 4], p[i + 5],
                       bias);
  }
  const c10::optional<at::Tensor> bias =
      p[i + 1].numel() ? c10::optional<at::Tensor>(p[i + 1]) : c10::nullopt;
  return at::linear(x, p[i], bias);
}

at::Tensor decode_layers(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                         const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& kv_caches, const at::Tensor& slots,
                         const at::Tensor& block_table, const at::Tensor& seq_lens,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                         int64_t sliding_window) {
  const int64_t num_layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == num_layers * kLayerSlots,
              "decode_layers: expected ", kLayerSlots, " parameter slots per layer");
  const int64_t n = x.size(0), hidden = x.size(1);
  const int64_t q_size = num_heads * head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  for (int64_t l = 0; l < num_layers; l++) {
    const int64_t base = l * kLayerSlots;
    at::Tensor kv = kv_caches[l];
    at::Tensor qkv = apply_linear(rms_norm(x, params[base], eps), params, base + 2).contiguous();
    // RoPE on q and k in place, k and v into the cache (what apply_rope + write_kv do).
    rope_and_cache(qkv, cos, sin, kv, slots, num_heads, num_kv_heads, head_dim);
    const at::Tensor q = qkv.slice(1, 0, q_size).view({n, num_heads, head_dim});
    const at::Tensor attn =
        paged_decode_attention(q, kv, block_table, seq_lens, scale, sliding_window);
    x = x + apply_linear(attn.view({n, q_size}), params, base + 2 + kLinearSlots);
    const at::Tensor gate_up = apply_linear(rms_norm(x, params[base + 1], eps), params,
                                            base + 2 + 2 * kLinearSlots);
    x = x + apply_linear(silu_mul(gate_up), params, base + 2 + 3 * kLinearSlots);
  }
  return x;
}


// ---------------------------------------------------------------------------------------------
// Greedy LM head: argmax_v (x W^T)[m, v] without writing the [M, V] logits.
//
// A greedy step needs one number per row out of M x V logits (M x 49152 for the default
// vocabulary): writing them and reading them back for argmax costs as much as the matmul
// when the hidden size is small, and torch's GEMM is slow on a skinny K (hidden 64).
// The weight is packed once into panels of 16 vocabulary rows, [ceil(V/16)][K][16], so one
// k step is two 8-wide loads shared by MT activation rows (broadcast x[m, k]): MT x 2
// accumulators, no horizontal sums. Each logit is one FMA chain over k = 0..K-1 whatever M
// is and however the panels are split between threads, so the result is batch invariant.
// Ties go to the lowest vocabulary id (torch.argmax's rule); NaN logits are never picked.

constexpr int kPanel = 16;

at::Tensor pack_lm_head(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_lm_head: float32 [V, K]");
  const at::Tensor wc = w.contiguous();
  const int64_t V = wc.size(0), K = wc.size(1), P = (V + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({P, K, kPanel}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++)
      for (int64_t j = 0; j < kPanel && p * kPanel + j < V; j++) {
        const float* row = src + (p * kPanel + j) * K;
        float* out = dst + p * K * kPanel + j;
        for (int64_t k = 0; k < K; k++) out[k * kPanel] = row[k];
      }
  });
  return packed;
}

// The greedy heads' loop: contiguous ranges of vocabulary panels, one chunk per thread (the
// work per panel is uniform, and chunks merged in order keep ties with the lowest id), and in
// each panel the rows in tiles of 6, then the rest:
// tile(std::integral_constant<int, rows>, chunk, panel, first row).
template <typename Tile>
void for_each_head_tile(int64_t P, int64_t M, int64_t chunks, const Tile& tile) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c++)
      for (int64_t p = c * P / chunks; p < (c + 1) * P / chunks; p++) {
        int64_t m = 0;
        for (; m + 6 <= M; m += 6) tile(std::integral_constant<int, 6>{}, c, p, m);
        switch (M - m) {
          case 5: tile(std::integral_constant<int, 5>{}, c, p, m); break;
          case 4: tile(std::integral_constant<int, 4>{}, c, p, m); break;
          case 3: tile(std::integral_constant<int, 3>{}, c, p, m); break;
          case 2: tile(std::integral_constant<int, 2>{}, c, p, m); break;
          case 1: tile(std::integral_constant<int, 1>{}, c, p, m); break;
          default: break;
        }
      }
  });
}

template <int MT>
inline void lm_head_tile(const float* x, int64_t K, const float* panel, int64_t v0,
                         int64_t vocab, LaneBest* best) {
  __m256 acc[MT][2];
#pragma GCC unroll 8
  for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k++) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) {
      const __m256 xb = _mm256_broadcast_ss(x + i * K + k);
      acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
    }
  }
  const bool tail = v0 + kPanel > vocab;  // the zero-padded last panel: pad lanes never win
  // Fully unrolled, so that acc has constant indices only: with a loop-variable index GCC
  // keeps acc in memory too and stores all 12 accumulators every k step (2x slower).
#pragma GCC unroll 8
  for (int i = 0; i < MT; i++) {
    lane_best_update(best[i], 0, acc[i][0], v0, vocab, tail);
    lane_best_update(best[i], 1, acc[i][1], v0 + 8, vocab, tail);
  }
}

// (ids int64 [M], max logit float32 [M]) of x [M, K] against a pack_lm_head() panel set.
std::vector<at::Tensor> lm_head_argmax(const at::Tensor& x_in, const at::Tensor& packed,
                                       int64_t vocab) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: float32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "packed: pack_lm_head() output");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "x and the packed LM head disagree on the hidden size");
  TORCH_CHECK(vocab > (P - 1) * kPanel && vocab <= P * kPanel, "vocab does not match panels");
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P));
  std::vector<LaneBest> best(chunks * M);
  reset_lane_best(best.data(), chunks * M);
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  for_each_head_tile(P, M, chunks, [&](auto rows, int64_t c, int64_t p, int64_t m) {
    lm_head_tile<decltype(rows)::value>(xp + m * K, K, wp + p * K * kPanel, p * kPanel, vocab,
                                        best.data() + c * M + m);
  });
  return best_of_rows(best.data(), chunks, M, x.options());
}

// ---------------------------------------------------------------------------------------------
// Greedy LM head, bf16 filter: the same ids and max logits as lm_head_argmax, about twice as
// fast where the CPU has AVX512_BF16 (1.7x at hidden 576, 2-2.6x at the tiny model's 64).
//
// Pass 1 computes every logit approximately, a_v = x~ . w~_v: x and the weight rounded to bf16
// (8 significant bits), products summed by vdpbf16ps (two bf16 products per float32 lane per
// instruction: twice the FMAs' rate, half the weight bytes). Against e_v, lm_head_argmax's
// float32 FMA chain over x and w_v,
//     a_v - e_v = sum_k (x~_k - x_k) w~_vk + x_k (w~_vk - w_vk)  + (both sums' rounding)
//     |a_v - e_v| <= ||dx|| ||w~_v|| + ||x|| ||dw_v|| + g (||x~|| ||w~_v|| + ||x|| ||w_v||) = B_v
// by Cauchy-Schwarz, with dx = x~ - x (known exactly here), dw_v = w~_v - w_v (its norm packed
// with the weights), and g = 1.01 K 2^-24 for a K-term float32 sum; ||w_v|| <= ||w~_v|| +
// ||dw_v|| folds B_v into two per-row coefficients of two per-token norms (inflated by 0.1%
// for their own rounding). The true argmax v* has a_v* + B_v* >= e_v* >= e_u >= a_u - B_u for
// every u: each v with a_v + B_v >= max_u (a_u - B_u) is kept as a candidate, and pass 2
// recomputes those exactly, with lm_head_argmax's own FMA chain over the float32 panels.
// On the default model's real hidden states that kept a median of 1 candidate per row (90th
// percentile 3, max 9); one bound for all tokens (||x|| max ||w_v|| times 2u) kept a median
// of 209. A row whose bound is not finite (inf or NaN in x) or that kept no candidate goes
// through lm_head_argmax itself.
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define SHOAL_BF16 1
#else
#define SHOAL_BF16 0
#endif

struct Candidate {
  int32_t id;
  float approx, bound;
};

struct Candidates {
  float floor = -INFINITY;  // max over seen tokens of approx - bound
  std::vector<Candidate> kept;

  void prune() {
    kept.erase(std::remove_if(kept.begin(), kept.end(),
                              [&](const Candidate& c) { return !(c.approx + c.bound >= floor); }),
               kept.end());
  }
};

#if SHOAL_BF16
// MT rows x 16 vocabulary entries of the bf16 panels ([P][K2][16] pairs of bf16 as uint32);
// `norms` holds the panel's ||w~_v|| (16 floats) then ||dw_v|| (16), coef the rows' two
// coefficients of B_v.
template <int MT>
inline void lm_head_bf16_tile(const uint32_t* xb, int64_t K2, const uint32_t* panel,
                              const float* norms, int64_t v0, int64_t vocab, const float* coef,
                              Candidates* cand) {
  __m256 acc[MT][2];
#pragma GCC unroll 8
  for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K2; k++) {
    const __m256bh w0 =
        (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kPanel));
    const __m256bh w1 =
        (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * kPanel + 8));
#pragma GCC unroll 8
    for (int i = 0; i < MT; i++) {
      const __m256bh xv = (__m256bh)_mm256_set1_epi32(static_cast<int>(xb[i * K2 + k]));
      acc[i][0] = _mm256_dpbf16_ps(acc[i][0], xv, w0);
      acc[i][1] = _mm256_dpbf16_ps(acc[i][1], xv, w1);
    }
  }
  const __m256 n1a = _mm256_loadu_ps(norms), n1b = _mm256_loadu_ps(norms + 8);
  const __m256 n2a = _mm256_loadu_ps(norms + 16), n2b = _mm256_loadu_ps(norms + 24);
#pragma GCC unroll 8
  for (int i = 0; i < MT; i++) {
    const __m256 c1 = _mm256_set1_ps(coef[2 * i]), c2 = _mm256_set1_ps(coef[2 * i + 1]);
    const __m256 ba = _mm256_fmadd_ps(c1, n1a, _mm256_mul_ps(c2, n2a));
    const __m256 bb = _mm256_fmadd_ps(c1, n1b, _mm256_mul_ps(c2, n2b));
    const __m256 floor = _mm256_set1_ps(cand[i].floor);
    const int mask =
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(acc[i][0], ba), floor, _CMP_GE_OQ)) |
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_add_ps(acc[i][1], bb), floor, _CMP_GE_OQ)) << 8;
    if (!mask) continue;  // the common case: nothing can beat this row's best so far
    alignas(32) float v[16], b[16];
    _mm256_store_ps(v, acc[i][0]);
    _mm256_store_ps(v + 8, acc[i][1]);
    _mm256_store_ps(b, ba);
    _mm256_store_ps(b + 8, bb);
    Candidates& c = cand[i];
    for (int j = 0; j < 16; j++) {
      if (!(mask >> j & 1) || v0 + j >= vocab) continue;
      c.kept.push_back({static_cast<int32_t>(v0 + j), v[j], b[j]});
      c.floor = std::max(c.floor, v[j] - b[j]);
    }
    if (c.kept.size() > 256) c.prune();
  }
}
#endif

// One logit exactly as lm_head_argmax's tile computes it (one FMA chain over k).
inline float exact_logit(const float* x, int64_t K, const float* packed, int64_t v) {
  const float* w = packed + (v / kPanel) * K * kPanel + v % kPanel;
  float acc = 0.f;
  for (int64_t k = 0; k < K; k++) acc = std::fma(x[k], w[k * kPanel], acc);
  return acc;
}

// (ids int64 [M], max logits float32 [M]), equal to lm_head_argmax(x, packed, vocab), from
// pack_lm_head_bf16's copies of the same weight (shoal/model/llama.py): `bf16` [P, ceil(K / 2),
// 16] int32 and `norms` [P, 2, 16] float32 (||w~_v||, ||w~_v - w_v||). Without AVX512_BF16 in
// this build: lm_head_argmax.
std::vector<at::Tensor> lm_head_argmax_bf16(const at::Tensor& x_in, const at::Tensor& bf16,
                                            const at::Tensor& norms, const at::Tensor& packed,
                                            int64_t vocab) {
#if SHOAL_BF16
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "x: float32 [M, K]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0), K2 = (K + 1) / 2;
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K && packed.size(2) == kPanel &&
                  packed.is_contiguous(),
              "packed: pack_lm_head() output for this hidden size");
  TORCH_CHECK(bf16.dim() == 3 && bf16.size(0) == P && bf16.size(1) == K2 &&
                  bf16.size(2) == kPanel && bf16.scalar_type() == at::kInt &&
                  bf16.is_contiguous(),
              "bf16: the bf16 panels of this weight");
  TORCH_CHECK(norms.dim() == 3 && norms.size(0) == P && norms.size(1) == 2 &&
                  norms.size(2) == kPanel && norms.scalar_type() == at::kFloat &&
                  norms.is_contiguous(),
              "norms: the [panels, 2, 16] row norms of this weight");
  TORCH_CHECK(vocab > (P - 1) * kPanel && vocab <= P * kPanel, "vocab does not match panels");
  const float* xp = x.data_ptr<float>();
  // x in bf16 pairs (round to nearest even, zero-padded to an even K) and each row's two
  // coefficients of B_v: ||dx|| + g (||x~|| + ||x||) for ||w~_v||, (1 + g) ||x|| for ||dw_v||.
  std::vector<uint32_t> xb(static_cast<size_t>(M * K2));
  std::vector<float> coef(static_cast<size_t>(2 * M));
  const double g = 1.01 * static_cast<double>(K) * 0x1p-24, safety = 1.001;
  for (int64_t m = 0; m < M; m++) {
    const float* r = xp + m * K;
    uint16_t* out = reinterpret_cast<uint16_t*>(xb.data() + m * K2);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                       (__m128i)_mm256_cvtneps_pbh(_mm256_loadu_ps(r + k)));
    if (k < 2 * K2) {  // the last < 8 inputs and the pad, through one zero-filled vector
      alignas(32) float tail[8] = {};
      std::copy(r + k, r + K, tail);
      alignas(16) uint16_t h[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(h),
                      (__m128i)_mm256_cvtneps_pbh(_mm256_load_ps(tail)));
      std::copy(h, h + (2 * K2 - k), out + k);
    }
    double xx = 0, tt = 0, dd = 0;
    for (k = 0; k < K; k++) {
      uint32_t bits = static_cast<uint32_t>(out[k]) << 16;
      float t;
      std::memcpy(&t, &bits, 4);
      xx += static_cast<double>(r[k]) * r[k];
      tt += static_cast<double>(t) * t;
      dd += (static_cast<double>(t) - r[k]) * (static_cast<double>(t) - r[k]);
    }
    const double nx = std::sqrt(xx), nt = std::sqrt(tt), nd = std::sqrt(dd);
    // (plus an absolute slack for what flushing denormals to zero can lose)
    coef[2 * m] = static_cast<float>((nd + g * (nt + nx)) * safety + K * 0x1p-120);
    coef[2 * m + 1] = static_cast<float>((1 + g) * nx * safety);
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P));
  std::vector<Candidates> cand(static_cast<size_t>(chunks * M));
  const uint32_t* wb = reinterpret_cast<const uint32_t*>(bf16.data_ptr<int32_t>());
  const float* np = norms.data_ptr<float>();
  for_each_head_tile(P, M, chunks, [&](auto rows, int64_t ch, int64_t p, int64_t m) {
    lm_head_bf16_tile<decltype(rows)::value>(xb.data() + m * K2, K2, wb + p * K2 * kPanel,
                                             np + p * 2 * kPanel, p * kPanel, vocab,
                                             &coef[2 * m], cand.data() + ch * M + m);
  });
  at::Tensor ids = at::empty({M}, x.options().dtype(at::kLong));
  at::Tensor vals = at::empty({M}, x.options());
  int64_t* idp = ids.data_ptr<int64_t>();
  float* vp = vals.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  std::vector<int64_t> fallback;
  for (int64_t m = 0; m < M; m++) {
    float floor = -INFINITY;
    for (int64_t ch = 0; ch < chunks; ch++) floor = std::max(floor, cand[ch * M + m].floor);
    float bv = -INFINITY;
    int64_t bi = -1;
    // Candidates in id order (chunks hold increasing id ranges, each kept in order): a
    // strict > keeps the lowest id of equal logits, as torch.argmax does; NaN never wins.
    for (int64_t ch = 0; ch < chunks; ch++)
      for (const Candidate& c : cand[ch * M + m].kept) {
        if (!(c.approx + c.bound >= floor)) continue;
        const float e = exact_logit(xp + m * K, K, wp, c.id);
        if (!std::isnan(e) && (bi < 0 || e > bv)) {
          bv = e;
          bi = c.id;
        }
      }
    if (bi < 0 || !std::isfinite(floor) || !std::isfinite(coef[2 * m]) ||
        !std::isfinite(coef[2 * m + 1])) {
      fallback.push_back(m);
      continue;
    }
    idp[m] = bi;
    vp[m] = bv;
  }
  if (!fallback.empty()) {  // rows the filter cannot vouch for: the exact kernel
    const at::Tensor rows = x.index_select(0, at::tensor(fallback, x.options().dtype(at::kLong)));
    const auto exact = lm_head_argmax(rows, packed, vocab);
    for (size_t i = 0; i < fallback.size(); i++) {
      idp[fallback[i]] = exact[0].data_ptr<int64_t>()[i];
      vp[fallback[i]] = exact[1].data_ptr<float>()[i];
    }
  }
  return {ids, vals};
#else
  (void)bf16, (void)norms;
  return lm_head_argmax(x_in, packed, vocab);
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel runs without the GIL (arguments are converted before, results after), so
  // the engine's ZMQ input and output threads keep moving while a step computes.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("int8_linear", &int8_linear, nogil,
        "y = x W^T (+ bias): int8 weights, per-row int8 activations, float32 outlier channels");
  m.def("paged_decode_attention", &paged_decode_attention, nogil,
        "attention of one query token per request over its paged KV cache");
  m.def("rms_norm", &rms_norm, nogil, "RMSNorm over the last dim (float32)");
  m.def("silu_mul", &silu_mul, nogil, "[.., 2 I] (gate | up) -> silu(gate) * up");
  m.def("rope_and_cache", &rope_and_cache, nogil,
        "RoPE on qkv's q and k heads in place, then its k and v rows into the paged cache");
  m.def("decode_layers", &decode_layers, nogil,
        "every decoder layer of a decode-only step (float32, CPU) in one call");
  m.def("pack_lm_head", &pack_lm_head, nogil, "LM head weight [V, K] -> panels for lm_head_argmax");
  m.def("int8_linear_argmax", &int8_linear_argmax, nogil,
        "greedy tokens: (argmax ids, max logits) of int8_linear's output without writing it");
  m.def("lm_head_argmax", &lm_head_argmax, nogil,
        "greedy tokens: (argmax ids, max logits) of x W^T without writing the logits");
  m.def("lm_head_argmax_bf16", &lm_head_argmax_bf16, nogil,
        "lm_head_argmax's result through a bf16 filter (AVX512_BF16; else lm_head_argmax)");
  m.attr("bf16") = static_cast<bool>(SHOAL_BF16);  // lm_head_argmax_bf16 filters
  register_q4(m);
  m.attr("vnni") = shoal_native::kVnni;  // integer products with AVX-512 VNNI (shared.h)
  // variants.source_hash() of the sources, flags and torch this module was built from
  // (setup.py passes it; "h" keeps the token an identifier for the preprocessor).
#ifndef SHOAL_SOURCE_HASH
#define SHOAL_SOURCE_HASH hunknown
#endif
#define SHOAL_STR2(x) #x
#define SHOAL_STR(x) SHOAL_STR2(x)
  m.attr("source_hash") = std::string(SHOAL_STR(SHOAL_SOURCE_HASH)).substr(1);
}
