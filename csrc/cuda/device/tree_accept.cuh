// Device code: greedy acceptance over a token tree, one block per batch row. No torch here.
//
// Rule (= specdec.ops.tree_ops.greedy_accept_ref, see specdec/ops/accept.py): node i is
// acceptable when every token on its root path equals the target argmax at its parent
// (tokens[j] == argmax[parents[j] + 1]) and its depth is <= max_depth; the accepted path
// ends at the deepest acceptable node, ties to the lower index; bonus = argmax[tip + 1]
// (argmax[0] when nothing is accepted).
//
// Each thread climbs from its nodes to the root (O(depth), in parallel), then the block
// takes max over key = depth << 32 | (0xffffffff - i) with a shared atomicMax, which
// orders by depth and then by lower index. Thread 0 writes the path by climbing from
// the tip; the other positions get -1. A malformed parent (not in [-1, j)) makes the
// node unacceptable instead of looping.
#pragma once
#include <cstdint>

namespace specdec {
namespace cuda {

struct GreedyAcceptParams {
  const int64_t* parents;   // [B, n] (batch stride may be 0)
  const int64_t* tokens;    // [B, n]
  const int64_t* argmax;    // [B, n + 1]
  int64_t* path;            // [B, max_depth]
  int64_t* num_accepted;    // [B]
  int64_t* bonus;           // [B]
  int64_t stride_parents, stride_tokens, stride_argmax, stride_path;
  int64_t n;
  int64_t max_depth;
};

__global__ void greedy_accept_kernel(GreedyAcceptParams p) {
  __shared__ unsigned long long best_key;
  const int64_t b = blockIdx.x;
  const int64_t* par = p.parents + b * p.stride_parents;
  const int64_t* tok = p.tokens + b * p.stride_tokens;
  const int64_t* am = p.argmax + b * p.stride_argmax;
  int64_t* path = p.path + b * p.stride_path;
  if (threadIdx.x == 0) best_key = 0ull;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x) {
    int64_t depth = 0;
    bool ok = true;
    for (int64_t j = i; j >= 0;) {
      const int64_t pj = par[j];
      if (pj < -1 || pj >= j || tok[j] != am[pj + 1] || ++depth > p.max_depth) {
        ok = false;
        break;
      }
      j = pj;
    }
    if (ok && depth > 0) {
      const unsigned long long key = (static_cast<unsigned long long>(depth) << 32) |
                                     (0xffffffffull - static_cast<unsigned long long>(i));
      atomicMax(&best_key, key);
    }
  }
  __syncthreads();
  const unsigned long long key = best_key;
  const int64_t num = static_cast<int64_t>(key >> 32);
  const int64_t best = num > 0 ? static_cast<int64_t>(0xffffffffull - (key & 0xffffffffull)) : -1;
  for (int64_t k = num + threadIdx.x; k < p.max_depth; k += blockDim.x) path[k] = -1;
  if (threadIdx.x == 0) {
    int64_t node = best;
    for (int64_t k = num - 1; k >= 0; --k) {
      path[k] = node;
      node = par[node];
    }
    p.num_accepted[b] = num;
    p.bonus[b] = am[best + 1];
  }
}

}  // namespace cuda
}  // namespace specdec
