#include "tree_ops.h"

#include <stdexcept>
#include <string>

namespace specdec {

std::vector<int64_t> greedy_accept(const std::vector<int64_t>& parents,
                                   const std::vector<int64_t>& tokens,
                                   const std::vector<int64_t>& argmax) {
  const int64_t n = static_cast<int64_t>(parents.size());
  if (static_cast<int64_t>(tokens.size()) != n || static_cast<int64_t>(argmax.size()) != n + 1) {
    throw std::invalid_argument("greedy_accept: need parents[n], tokens[n], argmax[n+1]; got n=" +
                                std::to_string(n) + ", tokens=" + std::to_string(tokens.size()) +
                                ", argmax=" + std::to_string(argmax.size()));
  }
  // depth[i] > 0 iff node i and all its ancestors match; parents precede children.
  std::vector<int64_t> depth(n, 0);
  int64_t best = -1, best_depth = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = parents[i];
    if (p < -1 || p >= i) throw std::invalid_argument("greedy_accept: parents[i] must be in [-1, i)");
    const int64_t parent_depth = (p < 0) ? 0 : depth[p];
    if ((p < 0 || parent_depth > 0) && tokens[i] == argmax[p + 1]) {
      depth[i] = parent_depth + 1;
      if (depth[i] > best_depth) {
        best_depth = depth[i];
        best = i;
      }
    }
  }
  std::vector<int64_t> path(best_depth);
  for (int64_t v = best, d = best_depth - 1; v >= 0; v = parents[v], --d) path[d] = v;
  return path;
}

}  // namespace specdec
