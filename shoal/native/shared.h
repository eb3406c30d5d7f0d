// What kernels.cpp's int8_linear and q4.cpp's q4_linear share: the lane mask of a partial
// 8-channel panel, and how an [M, N] output is cut into work items for the threads.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace shoal_native {

// Lanes of output channels n .. n + 7 that exist (the last panel may be partial).
inline __m256i lane_mask(int64_t n, int64_t N) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(N - n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Calls f(m_begin, m_end, n_begin, n_end) for every item, spread over torch's threads.
// Items are 40 rows x 128 output channels (32 when all rows fit one row block: more items to
// share, and an even split of the layer shapes' 576 and 960 outputs between two threads,
// where 64 gave one thread 5 of 9 items; 1.01-1.05x at 1 and 16 rows), row block outer, so a thread's items share their rows in cache while it walks the
// column blocks' weights. With at most 4 row blocks (a decode batch: M = 64 is 40 + 24 rows)
// they go column block outer instead: threads then split the columns rather than unequal
// row blocks, and each column block's weights come from memory once for all its rows.
template <typename F>
void for_each_work_item(int64_t M, int64_t N, const F& f) {
  constexpr int64_t MB = 40;
  const int64_t NB = M <= MB ? 32 : 128;
  const int64_t n_blocks = (N + NB - 1) / NB, m_blocks = (M + MB - 1) / MB;
  const bool columns_outer = m_blocks <= 4;
  at::parallel_for(0, m_blocks * n_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t item = b0; item < b1; item++) {
      const int64_t mi = columns_outer ? item % m_blocks : item / n_blocks;
      const int64_t ni = columns_outer ? item / m_blocks : item % n_blocks;
      const int64_t mb = mi * MB, nb = ni * NB;
      f(mb, std::min(M, mb + MB), nb, std::min(N, nb + NB));
    }
  });
}

}  // namespace shoal_native
