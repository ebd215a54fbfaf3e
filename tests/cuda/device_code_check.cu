// Standalone translation unit for tests/test_cuda_compile.py: compiles the device code
// (csrc/cuda/device/*.cuh) with nvcc alone, no torch headers, instantiating every kernel.
#include <cstdint>

#include "device/kv_compaction.cuh"
#include "device/tree_accept.cuh"

namespace sc = specdec::cuda;

template __global__ void sc::compact_kv_kernel<uint4, 4>(sc::CompactKVParams);
template __global__ void sc::compact_kv_kernel<uint2, 4>(sc::CompactKVParams);
template __global__ void sc::compact_kv_kernel<uint32_t, 4>(sc::CompactKVParams);
template __global__ void sc::compact_kv_kernel<uint16_t, 4>(sc::CompactKVParams);
template __global__ void sc::compact_kv_kernel<uint8_t, 4>(sc::CompactKVParams);

// Host side: the launch shapes the torch launchers use must be expressible without torch.
void device_code_check_launch(sc::CompactKVParams kv, sc::GreedyAcceptParams ga, cudaStream_t stream) {
  sc::compact_kv_kernel<uint4, 4><<<dim3(1, 2), 128, 0, stream>>>(kv);
  sc::greedy_accept_kernel<<<1, 32, 0, stream>>>(ga);
}
