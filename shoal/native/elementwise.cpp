// Elementwise steps of a decoder layer: rms_norm (RMSNorm), silu_mul (SiLU(gate) * up) and
// rope_and_cache (RoPE on q and k, then this step's k and v rows into the paged KV cache).
//
// Each replaces several ATen ops (RMSNorm 7: pow, mean, add, rsqrt, two muls, a copy; RoPE
// with the cache write 10), each a dispatch and a pass over memory. Rows are independent and
// each element gets a fixed sequence of operations, so results do not depend on the batch or
// the thread split. RMSNorm and SiLU are not bit-identical to torch's (another summation
// order, another exp), so the Python layers call these same kernels whenever the kernels are
// loaded, and a token gets the same bits on either path (decode_layers.cpp); the RoPE
// rotation is the same three roundings as torch's (x1 c - x2 s: two products, one
// difference; FMA contraction is off for it), so it is bit-identical to apply_rope
// (shoal/model/rotary.py).

#include "shared.h"

#include <ATen/ops/empty_like.h>

#include <cstring>

namespace shoal_native {

// out = x / sqrt(mean(x^2) + eps) * w, per row of [n, K]; transformers' order: (x * r) * w.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat,
              "rms_norm: float32 only");
  const int64_t K = x_in.size(-1);
  TORCH_CHECK(w_in.numel() == K, "rms_norm: weight size ", w_in.numel(), " != ", K);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  auto out = at::empty_like(x);
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
      for (; i < K; i++) ss = std::fma(xr[i], xr[i], ss);  // explicit: attention.cpp's dot()
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
  TORCH_CHECK(gu_in.scalar_type() == at::kFloat && gu_in.size(-1) % 2 == 0,
              "silu_mul: float32 [..., 2 I] expected");
  const at::Tensor gu = gu_in.contiguous();
  const int64_t I = gu.size(-1) / 2, n = I ? gu.numel() / (2 * I) : 0;
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = I;
  auto out = at::empty(shape, gu.options());
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

namespace {

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

}  // namespace

// RoPE on the q and k heads of each row of qkv [n, (H + 2 KVH) D], in place, then this
// step's k and v rows copied into the paged cache at `slots` (the index_copy_ of write_kv).
// cos, sin: [n, 1, D / 2] (any row stride).
void rope_and_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                    at::Tensor& kv, const at::Tensor& slots, int64_t H, int64_t KVH, int64_t D) {
  TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == at::kFloat,
              "rope_and_cache: qkv must be contiguous float32");
  TORCH_CHECK(D % 2 == 0 && cos.stride(-1) == 1 && sin.stride(-1) == 1,
              "rope_and_cache: cos/sin rows must be dense");
  TORCH_CHECK(kv.is_contiguous() && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "rope_and_cache: contiguous cache and int64 slots expected");
  const int64_t n = qkv.size(0), W = qkv.size(1);
  TORCH_CHECK(W == (H + 2 * KVH) * D, "rope_and_cache: qkv width");
  const int64_t total_slots = kv.size(1) * kv.size(2), row = KVH * D;
  float* qp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  TORCH_CHECK(kv.scalar_type() == at::kFloat || kv.scalar_type() == at::kHalf,
              "rope_and_cache: the cache must be float32 or float16");
  const bool half = kv.scalar_type() == at::kHalf;
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

}  // namespace shoal_native
