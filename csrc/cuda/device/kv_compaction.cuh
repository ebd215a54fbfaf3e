// Device code: KV-cache compaction after a verify step. No torch headers here.
//
// The cache is one tensor per K and V, [num_layers, num_kv_heads, max_seq_len, head_dim],
// head_dim contiguous. Tree node i was written at position start + i; for every
// j < num_accepted, the row at start + accepted_idx[j] moves to start + j, in every
// layer and head, K and V, in one launch.
//
// In-place safety: accepted_idx is strictly increasing, so accepted_idx[j] >= j: row j
// is read from a position that no earlier row j' < j writes (those write start + j').
// Each thread owns one (K|V, layer, head, vector column) and walks j in increasing
// order, loading a group of rows before storing them. A load may therefore run early,
// which is harmless (nothing before it wrote its position), and a store never runs
// before the load of an earlier row (program order, same thread, same address).
// Threads never share an element, so no barrier is needed. The copy moves raw bytes
// (Vec = 16/8/4/2/1-byte word), so every dtype works.
#pragma once
#include <cstdint>

namespace specdec {
namespace cuda {

struct CompactKVParams {
  char* base[2];          // K, V data pointers
  int64_t stride_l[2];    // byte strides of layer, head and position
  int64_t stride_h[2];
  int64_t stride_s[2];
  int64_t num_layers;
  int64_t num_heads;
  int64_t max_seq_len;
  int64_t row_vecs;       // head_dim * element size / sizeof(Vec)
  const int64_t* accepted_idx;  // [max_accepted]
  int64_t max_accepted;
  const int64_t* num_accepted;  // [1] or nullptr (= max_accepted)
  const int64_t* start_ptr;     // [1] or nullptr; position = start (+ *start_ptr)
  int64_t start;
};

template <typename Vec, int kUnroll>
__global__ void compact_kv_kernel(CompactKVParams p) {
  const int which = blockIdx.y;  // 0 = K, 1 = V
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.num_layers * p.num_heads * p.row_vecs) return;
  const int64_t v = col % p.row_vecs;
  const int64_t lh = col / p.row_vecs;
  char* base = p.base[which] + (lh / p.num_heads) * p.stride_l[which] +
               (lh % p.num_heads) * p.stride_h[which] + v * static_cast<int64_t>(sizeof(Vec));
  const int64_t ss = p.stride_s[which];
  int64_t a = p.max_accepted;
  if (p.num_accepted != nullptr) {
    const int64_t na = *p.num_accepted;
    a = na < 0 ? 0 : (na < a ? na : a);
  }
  const int64_t pos0 = p.start + (p.start_ptr != nullptr ? *p.start_ptr : 0);
  for (int64_t j0 = 0; j0 < a; j0 += kUnroll) {
    Vec buf[kUnroll];
    bool move[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u;
      move[u] = false;
      if (j < a) {
        const int64_t src = p.accepted_idx[j];
        if (src != j && src >= 0 && pos0 + src < p.max_seq_len) {
          move[u] = true;
          buf[u] = *reinterpret_cast<const Vec*>(base + (pos0 + src) * ss);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (move[u]) *reinterpret_cast<Vec*>(base + (pos0 + j0 + u) * ss) = buf[u];
    }
  }
}

}  // namespace cuda
}  // namespace specdec
