// Decode attention over the paged KV cache: paged_decode_attention, one query token per
// request against that request's keys and values, read in place through its block table (no
// gather into a padded copy), for a float32 or float16 cache.
//
// Per request: the scores q . k * scale of every query head for every key in its window,
// their softmax (normalised before the value pass, so that pass is a plain weighted sum),
// then the weighted sum of the values. With grouped-query attention each key and value
// vector is loaded once for up to 3 query heads that share its KV head (head_dim a multiple
// of 8 for the scores, of 32 for the values; other sizes take a plain per-head path). A
// request is computed by one thread, in the same order whatever else is in the batch, so
// its output depends on that request alone (batch invariance). The softmax's exp is exp256
// (shared.h), not torch's: results are close to, not bit-equal with, torch's attention.
//
// The cache is [2 (k, v), blocks, block_size, kv_heads, head_dim]; a token's keys (or
// values) for every KV head are one contiguous row of kv_heads x head_dim, found through the
// block table:
//     row of token t = block_table[r][t / block_size] * block_size + t % block_size
// Those rows lie anywhere in the cache, so the kernel prefetches them itself (the hardware
// prefetcher follows a block's tokens but cannot guess the next block).

#include "shared.h"

namespace shoal_native {
namespace {

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
// and keys ahead whose key and value rows are prefetched into L2. When a step's keys and
// values come from memory (a batch of requests with a few hundred keys each is tens of MB),
// L1 prefetches alone leave the value pass waiting on every chunk's first row, and the next
// request's first keys are never asked for: the L2 prefetches ask for the values during the
// scores pass and for the start of the thread's next request at the end of each (24 keys
// ahead was the best of the distances tried). When a call's keys and values fit in ~1 MB
// they stay in cache from one step to the next, and the extra prefetches only cost, so they
// are skipped there (`far`). Prefetches change no result.
constexpr int64_t kAhead = 8, kChunk = 16, kFar = 24;

template <typename T>
at::Tensor paged_decode_attention_impl(const at::Tensor& q, const at::Tensor& kv_cache,
                                       const at::Tensor& block_table,
                                       const at::Tensor& seq_lens, double scale,
                                       int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1,
              "paged_decode_attention: q must be float32 [n, heads, head_dim], last dim dense");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous(),
              "paged_decode_attention: kv_cache must be contiguous [2, blocks, block_size, "
              "kv_heads, head_dim]");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.stride(1) == 1,
              "paged_decode_attention: block_table must be int64 with dense rows");
  TORCH_CHECK(seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(),
              "paged_decode_attention: seq_lens must be contiguous int64");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = kv_cache.size(1), BS = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && H % KVH == 0, "paged_decode_attention: head shapes");
  const int64_t G = H / KVH;
  auto out = at::empty({n, H, D}, q.options());
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
  // one step to the next (one request at a few hundred tokens: they do).
  int64_t total_keys = 0;
  for (int64_t r = 0; r < n; r++) total_keys += lens[r];
  const bool far = total_keys * token_stride * static_cast<int64_t>(sizeof(T)) * 2 > (1 << 20);

  // One request per work item. Its keys are read token by token with every KV head at once:
  // a block holds its tokens' [kv_heads, head_dim] rows back to back, so each block is one
  // contiguous run of memory that the hardware prefetcher can follow (per-head passes jump
  // by kv_heads x head_dim and are latency-bound, many times slower).
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
        // slice while they are in L1, and the next chunk's are prefetched meanwhile. With
        // L == 0 the output is zeros, as on the path below.
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

}  // namespace

// out [n, heads, head_dim] float32: for each request r, its query q[r] ([heads, head_dim],
// float32, last dim dense) attends over its tokens 0 .. seq_lens[r] - 1 (the last
// `sliding_window` of them when that is > 0) in kv_cache ([2, blocks, block_size, kv_heads,
// head_dim], float32 or float16 as `--kv-cache-dtype` chose), found through block_table[r].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens,
                                  double scale, int64_t sliding_window) {
  if (kv_cache.scalar_type() == at::kHalf)
    return paged_decode_attention_impl<uint16_t>(q, kv_cache, block_table, seq_lens, scale,
                                                 sliding_window);
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat,
              "paged_decode_attention: kv_cache must be float32 or float16");
  return paged_decode_attention_impl<float>(q, kv_cache, block_table, seq_lens, scale,
                                            sliding_window);
}

}  // namespace shoal_native
