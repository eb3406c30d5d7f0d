// The greedy LM heads: the argmax over the vocabulary of each row of x W^T, and its max logit,
// without writing the [M, V] logits. pack_lm_head packs the float32 weight once;
// lm_head_argmax computes every logit exactly; lm_head_argmax_bf16 gives the same result
// through a bf16 filter where the CPU has AVX512_BF16. (The int8 head is int8.cpp's
// int8_linear_argmax.)
//
// A greedy step needs one number per row out of M x V logits (M x 49152 for the default
// vocabulary): writing them and reading them back for argmax costs as much as the matmul
// when the hidden size is small, and torch's GEMM is slow on a skinny K (hidden 64).
// The weight is packed once into panels of 16 vocabulary rows, [ceil(V/16)][K][16], so one
// k step is two 8-wide loads shared by MT activation rows (broadcast x[m, k]): MT x 2
// accumulators, no horizontal sums. Each logit is one FMA chain over k = 0..K-1 whatever M
// is and however the panels are split between threads, so the result is batch invariant.
// Ties go to the lowest vocabulary id (torch.argmax's rule); NaN logits are never picked.
// Each logit is summed in this fixed order, not torch's: it can differ from torch's logits in
// the last bits.

#include "shared.h"

#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>

#include <cstring>

namespace shoal_native {

constexpr int kPanel = 16;  // vocabulary rows per panel

// [V, K] float32 -> panels [ceil(V / 16), K, 16], the last one zero-padded.
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

namespace {

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
  // keeps acc in memory too and stores all 12 accumulators every k step.
#pragma GCC unroll 8
  for (int i = 0; i < MT; i++) {
    lane_best_update(best[i], 0, acc[i][0], v0, vocab, tail);
    lane_best_update(best[i], 1, acc[i][1], v0 + 8, vocab, tail);
  }
}

}  // namespace

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
// bf16 filter: the same ids and max logits as lm_head_argmax, from a first pass at twice the
// multiply rate over half the weight bytes where the CPU has AVX512_BF16 (SHOAL_BF16,
// shared.h).
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
// With a bound per token and per vocabulary row, a row of real hidden states keeps one or a
// few candidates; one bound for all tokens (||x|| max ||w_v|| times 2u) kept hundreds. A row
// whose bound is not finite (inf or NaN in x) or that kept no candidate goes through
// lm_head_argmax itself.

namespace {

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

}  // namespace

// (ids int64 [M], max logits float32 [M]), equal to lm_head_argmax(x, packed, vocab), from
// two more copies of the same weight (shoal/model/ops.py's pack_lm_head_bf16 packs them):
// `bf16` [P, ceil(K / 2), 16] int32 (pairs of bf16) and `norms` [P, 2, 16] float32
// (||w~_v||, ||w~_v - w_v||). Without AVX512_BF16 in this build: lm_head_argmax.
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

}  // namespace shoal_native
