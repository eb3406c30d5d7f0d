// decode_layers: every decoder layer of a decode-only step (float32, CPU) in one native call.
//
// Why it exists beside the Python layers: a decode step has one token per request, and at
// batch 1 a layer's ~35 small ops (norms, linears, RoPE, the cache write, attention, residual
// adds) cost more to dispatch one by one from Python than to compute. This runs the whole
// stack of layers from C++ with no Python in between. The Python layers
// (shoal/model/llama.py's DecoderLayer.forward) stay the reference and the only path for
// prefills, mixed steps and anything this does not cover: the runner takes this path
// (shoal/model/fused_decode.py's FusedDecode) only for a step of decode tokens alone,
// float32 on CPU, with the native kernels loaded and native decode attention on.
//
// What keeps the two identical, bit for bit:
// - The same operations in the same order: per layer rms_norm -> qkv linear -> rope_and_cache
//   -> paged_decode_attention -> o linear + residual -> rms_norm -> gate_up linear -> silu_mul
//   -> down linear + residual, as DecoderLayer.forward does them.
// - The same implementations: the native kernels of this module (elementwise.cpp,
//   attention.cpp, int8.cpp, q4.cpp), which the Python layers call too whenever the kernels
//   are loaded (they use the native RMSNorm and SiLU for exactly this reason, although torch
//   has its own), and at::linear, the op behind torch's F.linear, for float32 linears.
// - Tests run a prefill and decode steps both ways and require every logit equal:
//   test_fused_decode_layers_are_bit_identical_to_the_python_layers (tests/model/
//   test_native.py: float32 and int8 linears, biases, a sliding window, a float16 cache, an
//   odd head_dim) and test_fused_decode_layers_run_q4_linears_bit_identically
//   (tests/model/test_gguf_quant.py). A change to a layer's ops on one side must be made on
//   the other, or they fail.
//
// The parameters arrive as one flat list, kLayerSlots tensors per layer in the order
// shoal/model/fused_decode.py builds it (layer_params, linear_slots; its LAYER_SLOTS and
// LINEAR_SLOTS are kLayerSlots and kLinearSlots): the two norm weights, then kLinearSlots
// slots for each of the qkv, o, gate_up and down linears. A linear's kind is told by its
// first slot's dtype.

#include "shared.h"

#include <ATen/ops/linear.h>

namespace shoal_native {
namespace {

constexpr int64_t kLinearSlots = 7;  // int8: qweight, w_scale, w_colsum, main_idx,
                                     // outlier_idx, outlier_w, bias; float: weight, bias, -;
                                     // q4: packed, out_features, bias, -
constexpr int64_t kLayerSlots = 2 + 4 * kLinearSlots;

// x W^T (+ bias) for the linear whose slots start at p[i].
at::Tensor apply_linear(const at::Tensor& x, const std::vector<at::Tensor>& p, int64_t i) {
  if (p[i].scalar_type() == at::kByte) {  // q4: packed, out_features ([1] int64), bias
    const c10::optional<at::Tensor> bias =
        p[i + 2].numel() ? c10::optional<at::Tensor>(p[i + 2]) : c10::nullopt;
    return q4_linear(x.contiguous(), p[i], *p[i + 1].data_ptr<int64_t>(), bias);
  }
  if (p[i].scalar_type() == at::kChar) {
    const c10::optional<at::Tensor> bias =
        p[i + 6].numel() ? c10::optional<at::Tensor>(p[i + 6]) : c10::nullopt;
    return int8_linear(x.contiguous(), p[i], p[i + 1], p[i + 2], p[i + 3], p[i + 4], p[i + 5],
                       bias);
  }
  const c10::optional<at::Tensor> bias =
      p[i + 1].numel() ? c10::optional<at::Tensor>(p[i + 1]) : c10::nullopt;
  return at::linear(x, p[i], bias);
}

}  // namespace

// The hidden states after every layer, x [n, hidden] float32 -> [n, hidden]; each layer l
// writes this step's k and v rows into kv_caches[l] at `slots`. cos, sin: the tokens' RoPE
// rows; block_table, seq_lens, sliding_window: as paged_decode_attention takes them.
at::Tensor decode_layers(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                         const std::vector<at::Tensor>& params,
                         const std::vector<at::Tensor>& kv_caches, const at::Tensor& slots,
                         const at::Tensor& block_table, const at::Tensor& seq_lens,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps,
                         int64_t sliding_window) {
  const int64_t num_layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(params.size()) == num_layers * kLayerSlots,
              "decode_layers: expected ", kLayerSlots, " parameter slots per layer");
  const int64_t n = x.size(0);
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
    // x.add(y) is what x + y calls (ATen/TensorOperators.h, which would bring every op's
    // header with it); the residual adds are the Python layers' `x + ...`.
    x = x.add(apply_linear(attn.view({n, q_size}), params, base + 2 + kLinearSlots));
    const at::Tensor gate_up = apply_linear(rms_norm(x, params[base + 1], eps), params,
                                            base + 2 + 2 * kLinearSlots);
    x = x.add(apply_linear(silu_mul(gate_up), params, base + 2 + 3 * kLinearSlots));
  }
  return x;
}

}  // namespace shoal_native
