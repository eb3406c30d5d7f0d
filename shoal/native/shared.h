// What kernels.cpp's int8_linear and q4.cpp's q4_linear share: the lane mask of a partial
// 8-channel panel, and how an [M, N] output is cut into work items for the threads.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
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

namespace shoal_native {

// Which integer dot-product path this build compiled (the Python module's `vnni`).
constexpr bool kVnni = SHOAL_VNNI;

// Lanes of output channels n .. n + 7 that exist (the last panel may be partial).
inline __m256i lane_mask(int64_t n, int64_t N) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(N - n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Calls f(m_begin, m_end, n_begin, n_end) for every item, spread over torch's threads.
// Items are 40 rows x 128 output channels (32 when all rows fit one row block: more items to
// share, and an even split of the layer shapes' 576 and 960 outputs between two threads,
// where 64 gave one thread 5 of 9 items; 1.01-1.05x at 1 and 16 rows), row block outer, so a
// thread's items share their rows in cache while it walks the column blocks' weights. With at
// most 4 row blocks (a decode batch: M = 64 is 40 + 24 rows) they go column block outer
// instead: threads then split the columns rather than unequal row blocks, and each column
// block's weights come from memory once for all its rows.
//
// Each thread starts on its own contiguous range of items, front to back (its weights stream
// in order, and the kernels prefetch the next item's), and a thread that runs out takes items
// from the back of the range with the most left. Equal shares of items are not equal shares
// of time when the weights come from memory: with the static split the first thread done
// waited at the barrier (11% of a 16-row decode step's main thread), and taking the
// stragglers' items made the layer linears 1.0-1.1x faster at 16 rows, 1.14x at 64.
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

}  // namespace shoal_native
