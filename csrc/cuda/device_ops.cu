// Launchers: validate with TORCH_CHECK, pick the launch shape, launch on the current stream.
#include "device_ops.h"

#include <algorithm>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "device/kv_compaction.cuh"
#include "device/tree_accept.cuh"

namespace specdec {
namespace {

void check_scalar_int64(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.numel() == 1, name, " must hold one element, got ", t.numel());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Widest word (16/8/4/2/1 bytes) that divides every byte offset the kernel forms.
int vec_bytes(const cuda::CompactKVParams& p, int64_t row_bytes) {
  int64_t g = row_bytes;
  for (int w = 0; w < 2; ++w) {
    g |= static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.base[w]) & 15);
    g |= p.stride_l[w] | p.stride_h[w] | p.stride_s[w];
  }
  for (int w : {16, 8, 4, 2}) {
    if (g % w == 0) return w;
  }
  return 1;
}

template <typename Vec>
void launch_compact(cuda::CompactKVParams p, int64_t row_bytes, cudaStream_t stream) {
  p.row_vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t cols = p.num_layers * p.num_heads * p.row_vecs;
  constexpr int kThreads = 128;
  const int64_t blocks = (cols + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "compact_kv: cache too large for one launch");
  cuda::compact_kv_kernel<Vec, 4><<<dim3(static_cast<unsigned>(blocks), 2), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void compact_kv_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& accepted_idx,
                     const std::optional<at::Tensor>& num_accepted, const std::optional<at::Tensor>& start_t,
                     int64_t start) {
  TORCH_CHECK(k.dim() == 4 || k.dim() == 3,
              "compact_kv: k_cache must be [num_layers, Hkv, S_max, D] or [Hkv, S_max, D], got ", k.sizes());
  TORCH_CHECK(k.is_cuda(), "compact_kv: k_cache must be a CUDA tensor");
  TORCH_CHECK(k.sizes() == v.sizes(), "compact_kv: k_cache ", k.sizes(), " and v_cache ", v.sizes(),
              " must have one shape");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "compact_kv: k_cache and v_cache must share a dtype");
  TORCH_CHECK(k.device() == v.device(), "compact_kv: k_cache and v_cache must be on one device");
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1, "compact_kv: head_dim must be contiguous");
  TORCH_CHECK(accepted_idx.dim() == 1 && accepted_idx.scalar_type() == at::kLong,
              "compact_kv: accepted_idx must be 1-D int64");
  TORCH_CHECK(accepted_idx.device() == k.device(), "compact_kv: accepted_idx must be on ", k.device());
  TORCH_CHECK(accepted_idx.is_contiguous(), "compact_kv: accepted_idx must be contiguous");
  if (num_accepted.has_value()) check_scalar_int64(*num_accepted, k, "compact_kv: num_accepted");
  if (start_t.has_value()) check_scalar_int64(*start_t, k, "compact_kv: start_t");
  TORCH_CHECK(start >= 0 && start <= k.size(-2), "compact_kv: start=", start, " outside [0, ", k.size(-2), "]");
  if (accepted_idx.numel() == 0 || k.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t es = static_cast<int64_t>(k.element_size());
  const bool layered = k.dim() == 4;  // a single layer [Hkv, S_max, D] is num_layers = 1
  cuda::CompactKVParams p{};
  const at::Tensor* kv[2] = {&k, &v};
  for (int w = 0; w < 2; ++w) {
    p.base[w] = static_cast<char*>(kv[w]->data_ptr());
    p.stride_l[w] = layered ? kv[w]->stride(0) * es : 0;
    p.stride_h[w] = kv[w]->stride(-3) * es;
    p.stride_s[w] = kv[w]->stride(-2) * es;
  }
  p.num_layers = layered ? k.size(0) : 1;
  p.num_heads = k.size(-3);
  p.max_seq_len = k.size(-2);
  p.accepted_idx = accepted_idx.data_ptr<int64_t>();
  p.max_accepted = accepted_idx.numel();
  p.num_accepted = num_accepted.has_value() ? num_accepted->data_ptr<int64_t>() : nullptr;
  p.start_ptr = start_t.has_value() ? start_t->data_ptr<int64_t>() : nullptr;
  p.start = start;
  const int64_t row_bytes = k.size(-1) * es;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (vec_bytes(p, row_bytes)) {
    case 16: launch_compact<uint4>(p, row_bytes, stream); break;
    case 8: launch_compact<uint2>(p, row_bytes, stream); break;
    case 4: launch_compact<uint32_t>(p, row_bytes, stream); break;
    case 2: launch_compact<uint16_t>(p, row_bytes, stream); break;
    default: launch_compact<uint8_t>(p, row_bytes, stream); break;
  }
}

void greedy_accept_cuda(const at::Tensor& parents, const at::Tensor& tokens, const at::Tensor& argmax,
                        const at::Tensor& path, const at::Tensor& num_accepted, const at::Tensor& bonus) {
  TORCH_CHECK(tokens.dim() == 2, "greedy_accept: tokens must be [B, n], got ", tokens.sizes());
  const int64_t B = tokens.size(0), n = tokens.size(1);
  TORCH_CHECK(tokens.is_cuda(), "greedy_accept: tensors must be on CUDA");
  for (const at::Tensor* t : {&parents, &tokens, &argmax, &path, &num_accepted, &bonus}) {
    TORCH_CHECK(t->scalar_type() == at::kLong, "greedy_accept: every tensor must be int64, got ", t->scalar_type());
    TORCH_CHECK(t->device() == tokens.device(), "greedy_accept: every tensor must be on ", tokens.device());
  }
  TORCH_CHECK(parents.dim() == 2 && parents.size(0) == B && parents.size(1) == n,
              "greedy_accept: parents must be [B, n] = [", B, ", ", n, "], got ", parents.sizes());
  TORCH_CHECK(argmax.dim() == 2 && argmax.size(0) == B && argmax.size(1) == n + 1,
              "greedy_accept: argmax must be [B, n + 1] = [", B, ", ", n + 1, "], got ", argmax.sizes());
  TORCH_CHECK(path.dim() == 2 && path.size(0) == B, "greedy_accept: path must be [B, max_depth], got ",
              path.sizes());
  TORCH_CHECK(num_accepted.dim() == 1 && num_accepted.size(0) == B && bonus.dim() == 1 && bonus.size(0) == B,
              "greedy_accept: num_accepted and bonus must be [B]");
  TORCH_CHECK(parents.stride(1) == 1 && tokens.stride(1) == 1 && argmax.stride(1) == 1 && path.stride(1) == 1 &&
                  num_accepted.stride(0) == 1 && bonus.stride(0) == 1,
              "greedy_accept: the node dimension must be contiguous");
  TORCH_CHECK(n < (int64_t{1} << 31), "greedy_accept: tree too large");
  if (B == 0) return;

  const c10::cuda::CUDAGuard guard(tokens.device());
  cuda::GreedyAcceptParams p{};
  p.parents = parents.data_ptr<int64_t>();
  p.tokens = tokens.data_ptr<int64_t>();
  p.argmax = argmax.data_ptr<int64_t>();
  p.path = path.data_ptr<int64_t>();
  p.num_accepted = num_accepted.data_ptr<int64_t>();
  p.bonus = bonus.data_ptr<int64_t>();
  p.stride_parents = parents.stride(0);
  p.stride_tokens = tokens.stride(0);
  p.stride_argmax = argmax.stride(0);
  p.stride_path = path.stride(0);
  p.n = n;
  p.max_depth = path.size(1);
  const int64_t want = std::max<int64_t>(n, p.max_depth);
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (want + 31) / 32 * 32)));
  TORCH_CHECK(B < (int64_t{1} << 31), "greedy_accept: batch too large");
  cuda::greedy_accept_kernel<<<static_cast<unsigned>(B), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace specdec
