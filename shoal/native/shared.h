// What the kernel sources share, and the one place that lists what each defines for the others.
//
// - SHOAL_VNNI and SHOAL_BF16: which optional instructions this build's level compiled
//   (shoal/native/variants.py's -march flags decide; the module's `vnni` and `bf16`).
// - The integer linears' common parts (int8.cpp, q4.cpp): the lane mask of a partial 8-channel
//   panel and the split of an [M, N] output into work items for the threads.
// - Float vector helpers used by more than one family: exp for x <= 0, a horizontal sum.
// - The greedy heads' running argmax (int8.cpp's int8_linear_argmax, lm_head.cpp).
// - The declaration of every kernel: module.cpp registers them with Python, and a source may
//   call another's (decode_layers.cpp runs the layer kernels).
//
// Only the ATen headers every source needs (Tensor and its methods, parallel_for, at::empty);
// a source includes the other ops it calls itself (<ATen/ops/...>). Never torch/extension.h or
// ATen/ATen.h here: torch/extension.h (pybind11 and all of torch) took ~18 s to parse per
// source and level, ATen/ATen.h ~8 s, these ~5 s; module.cpp alone includes torch/extension.h.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

// AVX-512 VNNI with 256-bit vectors (Zen 4, Ice Lake and later): vpdpbusd multiplies 4 pairs
// of bytes (uint8 x int8) and adds them to an int32 lane in one instruction, where AVX2 needs
// vpmaddubsw + vpmaddwd + vpaddd. The integer sums are exact either way, so a kernel built
// with it gives the same bits as one built without (tests/model/test_native_targets.py
// builds both and compares). AVX512VL also gives 32 vector registers instead of 16, room for
// bigger register tiles.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define SHOAL_VNNI 1
#else
#define SHOAL_VNNI 0
#endif

// AVX512_BF16 (Zen 4, Sapphire Rapids): vdpbf16ps, two bf16 products per float32 lane, which
// lm_head.cpp's lm_head_argmax_bf16 uses as a filter before its exact pass (same results with
// or without it).
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define SHOAL_BF16 1
#else
#define SHOAL_BF16 0
#endif

namespace shoal_native {

// Which integer dot-product path this build compiled (the Python module's `vnni`).
constexpr bool kVnni = SHOAL_VNNI;
// Whether lm_head_argmax_bf16 filters with bf16 products (the Python module's `bf16`).
constexpr bool kBf16 = SHOAL_BF16;

// ---------------------------------------------------------------------------------------------
// Integer linears: panels and work items

// Lanes of output channels n .. n + 7 that exist (the last panel may be partial).
inline __m256i lane_mask(int64_t n, int64_t N) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(N - n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Calls f(m_begin, m_end, n_begin, n_end) for every item, spread over torch's threads.
// Items are 40 rows x 128 output channels (32 when all rows fit one row block: more items to
// share, and an even split between two threads of output sizes like 576 and 960, where 64
// gives one thread 5 of 9 items), row block outer, so a thread's items share their rows in
// cache while it walks the column blocks' weights. With at most 4 row blocks (a decode batch:
// M = 64 is 40 + 24 rows) they go column block outer instead: threads then split the columns
// rather than unequal row blocks, and each column block's weights come from memory once for
// all its rows.
//
// Each thread starts on its own contiguous range of items, front to back (its weights stream
// in order, and the kernels prefetch the next item's), and a thread that runs out takes items
// from the back of the range with the most left. Equal shares of items are not equal shares
// of time when the weights come from memory: with a static split the first thread done waits
// at the barrier while the slowest finishes its share.
//
// Which thread computes an item never changes its result: every output element gets the same
// operations whoever runs it.
template <typename F>
void for_each_work_item(int64_t M, int64_t N, const F& f) {
  constexpr int64_t MB = 40;
  const int64_t NB = M <= MB ? 32 : 128;
  const int64_t n_blocks = (N + NB - 1) / NB, m_blocks = (M + MB - 1) / MB;
  const bool columns_outer = m_blocks <= 4;
  const int64_t total = m_blocks * n_blocks;
  auto run = [&](uint64_t item_u) {
    const int64_t item = static_cast<int64_t>(item_u);
    const int64_t mi = columns_outer ? item % m_blocks : item / n_blocks;
    const int64_t ni = columns_outer ? item / m_blocks : item % n_blocks;
    const int64_t mb = mi * MB, nb = ni * NB;
    f(mb, std::min(M, mb + MB), nb, std::min(N, nb + NB));
  };
  const int64_t T = std::min<int64_t>(at::get_num_threads(), total);
  if (T <= 1 || at::in_parallel_region()) {
    for (int64_t item = 0; item < total; item++) run(static_cast<uint64_t>(item));
    return;
  }
  // Thread t's remaining items [lo, hi), packed as hi << 32 | lo so that one compare-exchange
  // takes an item from either end.
  std::vector<std::atomic<uint64_t>> ranges(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; t++) {
    const auto lo = static_cast<uint64_t>(t * total / T);
    const auto hi = static_cast<uint64_t>((t + 1) * total / T);
    ranges[t].store(hi << 32 | lo, std::memory_order_relaxed);
  }
  auto take = [&](int64_t t, bool front) -> int64_t {  // an item of range t, or -1
    uint64_t r = ranges[t].load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = r & 0xffffffffu, hi = r >> 32;
      if (lo >= hi) return -1;
      const uint64_t next = front ? hi << 32 | (lo + 1) : (hi - 1) << 32 | lo;
      if (ranges[t].compare_exchange_weak(r, next, std::memory_order_relaxed))
        return static_cast<int64_t>(front ? lo : hi - 1);
    }
  };
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      for (int64_t item; (item = take(t, true)) >= 0;) run(static_cast<uint64_t>(item));
      for (;;) {
        int64_t victim = -1;
        uint64_t most = 0;
        for (int64_t v = 0; v < T; v++) {
          const uint64_t r = ranges[v].load(std::memory_order_relaxed);
          const uint64_t left = (r >> 32) - std::min(r >> 32, r & 0xffffffffu);
          if (left > most) {
            most = left;
            victim = v;
          }
        }
        if (victim < 0) break;
        const int64_t item = take(victim, false);
        if (item >= 0) run(static_cast<uint64_t>(item));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Float vector helpers (attention.cpp, elementwise.cpp)

// exp for x <= 0 (attention's scores minus their max, SiLU's -|g|): 2^n * p(r),
// r = x - n ln 2, degree-6 polynomial; relative error ~2e-7 on [-87, 0], 0 below.
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
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(too_small, result);
}

// The sum of v's 8 lanes, always in the same order.
inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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
  // order its ids come in (work items may be taken out of order: for_each_work_item).
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
inline std::vector<at::Tensor> best_of_rows(const LaneBest* best, int64_t chunks, int64_t M,
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

// ---------------------------------------------------------------------------------------------
// The kernels (their contracts are at their definitions). module.cpp registers each with
// Python under its own name.

// int8.cpp
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const at::Tensor& w_colsum, const at::Tensor& main_idx,
                       const at::Tensor& outlier_idx, const at::Tensor& outlier_w,
                       const c10::optional<at::Tensor>& bias);
std::vector<at::Tensor> int8_linear_argmax(const at::Tensor& x, const at::Tensor& w,
                                           const at::Tensor& w_scale,
                                           const at::Tensor& w_colsum,
                                           const at::Tensor& main_idx,
                                           const at::Tensor& outlier_idx,
                                           const at::Tensor& outlier_w,
                                           const c10::optional<at::Tensor>& bias);
// q4.cpp
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, int64_t n_out,
                     const c10::optional<at::Tensor>& bias);
// attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens,
                                  double scale, int64_t sliding_window);
// elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps);
at::Tensor silu_mul(const at::Tensor& gu_in);
void rope_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                    at::Tensor& kv, const at::Tensor& slots, int64_t H, int64_t KVH, int64_t D);
// lm_head.cpp
at::Tensor pack_lm_head(const at::Tensor& w);
std::vector<at::Tensor> lm_head_argmax(const at::Tensor& x_in, const at::Tensor& packed,
                                       int64_t vocab);
std::vector<at::Tensor> lm_head_argmax_bf16(const at::Tensor& x_in, const at::Tensor& bf16,
                                            const at::Tensor& norms, const at::Tensor& packed,
                                            int64_t vocab);
// decode_layers.cpp
at::Tensor decode_layers(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                         const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& kv_caches, const at::Tensor& slots,
                         const at::Tensor& block_table, const at::Tensor& seq_lens,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                         int64_t sliding_window);

}  // namespace shoal_native
