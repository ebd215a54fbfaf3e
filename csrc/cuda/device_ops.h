// Launchers of the verify-step device ops (validate with TORCH_CHECK, then launch on the
// current stream). Registered as torch.library ops in bindings.cpp; no host syncs, so
// they can be captured in CUDA graphs.
#pragma once
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace specdec {

// specdec::compact_kv — move K/V of accepted tree nodes to the front of the tree slot.
//   k_cache, v_cache: [num_layers, Hkv, S_max, D] (or [Hkv, S_max, D]), same shape/dtype,
//                     head_dim contiguous; modified in place
//   accepted_idx:     [max_accepted] int64, strictly increasing node indices
//   num_accepted:     [1] int64 on device, or none (= max_accepted)
//   start_t, start:   first tree position = start (+ start_t[0] when given)
// Row start + accepted_idx[j] moves to start + j for j < num_accepted.
void compact_kv_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& accepted_idx,
                     const std::optional<at::Tensor>& num_accepted, const std::optional<at::Tensor>& start_t,
                     int64_t start);

// specdec::greedy_accept_out — greedy path selection over B token trees.
//   parents: [B, n] int64 (batch stride may be 0), tokens: [B, n] int64,
//   argmax: [B, n + 1] int64 (row 0 = root); outputs path [B, max_depth] int64 (-1 padded),
//   num_accepted [B] int64, bonus [B] int64.
void greedy_accept_cuda(const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& argmax,
                        const at::Tensor& path, const at::Tensor& num_accepted, const at::Tensor& bonus);

}  // namespace specdec
