// Tree ops on the host: acceptance bookkeeping that must not loop in Python.
#pragma once
#include <cstdint>
#include <vector>

namespace specdec {

// Greedy acceptance over a token tree.
//   parents:  [n]     parent of each node, -1 = root; parents[i] < i
//   tokens:   [n]     drafted token of each node
//   argmax:   [n + 1] target argmax at the root (row 0) and after each node (row i+1)
// Returns the accepted path (node indices, root to tip): the deepest path whose
// every token equals the target's argmax at its parent. Ties in depth go to the
// lower node index (the first-proposed branch).
std::vector<int64_t> greedy_accept(const std::vector<int64_t>& parents,
                                   const std::vector<int64_t>& tokens,
                                   const std::vector<int64_t>& argmax);

}  // namespace specdec
