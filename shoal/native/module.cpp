// The Python module: PYBIND11_MODULE, which registers every kernel (declared in shared.h,
// defined in the family sources) under its Python name with its docstring. The registrations
// live here, not beside each kernel, because they need pybind11 and torch's Python bindings
// (torch/extension.h, ~18 s to parse): in one file that is one parse per level, and the family
// sources include only the ATen headers they use (shared.h).
//
// Every kernel is registered with call_guard<gil_scoped_release>: it runs without the GIL (its
// arguments are converted before, its results after), so the engine's ZMQ input and output
// threads keep moving while a step computes.
//
// The module's attributes say what this build is: `vnni` and `bf16`, the optional
// instructions its level compiled (shared.h), and `source_hash`, which
// shoal/native/__init__.py compares with the sources it ships beside.
//
// setup.py compiles every source of shoal/native/variants.py's SOURCES into one extension per
// instruction-set level (_kernels_avx2, _kernels_avx512, _kernels_avx512bf16); the level's
// -march flags are the only difference between them, and every level gives the same bits.

#include <torch/extension.h>

#include "shared.h"

#include <string>

// variants.source_hash() of the sources, flags and torch this module was built from
// (setup.py passes it; "h" keeps the token an identifier for the preprocessor).
#ifndef SHOAL_SOURCE_HASH
#define SHOAL_SOURCE_HASH hunknown
#endif
#define SHOAL_STR2(x) #x
#define SHOAL_STR(x) SHOAL_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace sn = shoal_native;
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();

  // int8.cpp
  m.def("int8_linear", &sn::int8_linear, nogil,
        "y = x W^T (+ bias): int8 weights, per-row int8 activations, float32 outlier channels");
  m.def("int8_linear_argmax", &sn::int8_linear_argmax, nogil,
        "greedy tokens: (argmax ids, max logits) of int8_linear's output without writing it");
  // q4.cpp
  m.def("q4_linear", &sn::q4_linear, nogil,
        "y = x W^T (+ bias): GGUF 4-bit weight blocks (pack_q4 layout), per-block int8 "
        "activations");
  // attention.cpp
  m.def("paged_decode_attention", &sn::paged_decode_attention, nogil,
        "attention of one query token per request over its paged KV cache");
  // elementwise.cpp
  m.def("rms_norm", &sn::rms_norm, nogil, "RMSNorm over the last dim (float32)");
  m.def("silu_mul", &sn::silu_mul, nogil, "[.., 2 I] (gate | up) -> silu(gate) * up");
  m.def("rope_and_cache", &sn::rope_and_cache, nogil,
        "RoPE on qkv's q and k heads in place, then its k and v rows into the paged cache");
  // lm_head.cpp
  m.def("pack_lm_head", &sn::pack_lm_head, nogil,
        "LM head weight [V, K] -> panels for lm_head_argmax");
  m.def("lm_head_argmax", &sn::lm_head_argmax, nogil,
        "greedy tokens: (argmax ids, max logits) of x W^T without writing the logits");
  m.def("lm_head_argmax_bf16", &sn::lm_head_argmax_bf16, nogil,
        "lm_head_argmax's result through a bf16 filter (AVX512_BF16; else lm_head_argmax)");
  // decode_layers.cpp
  m.def("decode_layers", &sn::decode_layers, nogil,
        "every decoder layer of a decode-only step (float32, CPU) in one call");

  m.attr("vnni") = sn::kVnni;  // integer products with AVX-512 VNNI
  m.attr("bf16") = sn::kBf16;  // lm_head_argmax_bf16 filters with bf16 products
  m.attr("source_hash") = std::string(SHOAL_STR(SHOAL_SOURCE_HASH)).substr(1);
}
