// Self-test kernels with one planted bug each. The harness must catch every
// one: the test names the build where it shows and the message it must give.
// (The removed __syncthreads and the undersized dynamic shared memory are
// variants of the correct kernels, selected by their launchers' arguments.)

#include <assert.h>
#include <stdint.h>

#include "selftest.h"

// ----------------------------------------------------------------------------
// off-by-one read of global memory: `i <= n` reads x[n]. x: (n,); out: (1,).
// Seen by ASan as a heap-buffer-overflow.

__global__ void oob_read_sum_kernel(const float* __restrict__ x, int n, float* __restrict__ out) {
  __shared__ float warp_sums[32];
  float v = 0.0f;
  for (int i = threadIdx.x; i <= n; i += blockDim.x) v += x[i];  // BUG: <= n
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += warp_sums[w];
    *out = s;
  }
}

extern "C" int st_oob_read_sum(const float* x, int n, float* out) {
  GMPO_LAUNCH(oob_read_sum_kernel, 1, 128, 0, nullptr, x, n, out);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// __syncthreads inside a branch taken by half the block. out: (2, threads).

__global__ void divergent_barrier_kernel(float* out) {
  __shared__ float s[1024];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (threadIdx.x < blockDim.x / 2) __syncthreads();  // BUG: the other half never arrives
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

extern "C" int st_divergent_barrier(float* out, int threads) {
  GMPO_LAUNCH(divergent_barrier_kernel, 2, threads, 0, nullptr, out);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// A full shuffle mask in a block whose last warp is partial (e.g. 48 threads:
// lanes 16-31 of warp 1 do not exist).

__global__ void partial_warp_mask_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);  // BUG
  out[threadIdx.x] = v;
}

extern "C" int st_partial_warp_mask(float* out, int threads) {
  GMPO_LAUNCH(partial_warp_mask_kernel, 1, threads, 0, nullptr, out);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// A shuffle whose mask names lanes that never reach it: lanes 16-31 skip it
// and return.

__global__ void missing_lanes_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float v = static_cast<float>(threadIdx.x);
  if (lane < 16) v += __shfl_down_sync(0xffffffffu, v, 1);  // BUG: should name lanes 0-15 only
  out[threadIdx.x] = v;
}

extern "C" int st_missing_lanes(float* out) {
  GMPO_LAUNCH(missing_lanes_kernel, 1, 64, 0, nullptr, out);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// Half a warp waits in __syncthreads, the other half in a shuffle that names
// the first half: a deadlock on a GPU.

__global__ void barrier_vs_shuffle_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float v = static_cast<float>(threadIdx.x);
  if (lane < 16)
    __syncthreads();  // BUG
  else
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

extern "C" int st_barrier_vs_shuffle(float* out) {
  GMPO_LAUNCH(barrier_vs_shuffle_kernel, 1, 32, 0, nullptr, out);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// __trap() in one thread of one block, and a failing assert.

__global__ void trap_kernel(float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0f;
  __syncthreads();
  if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
}

extern "C" int st_trap(float* out) {
  GMPO_LAUNCH(trap_kernel, 3, 64, 0, nullptr, out);
  return static_cast<int>(cudaGetLastError());
}

__global__ void assert_kernel(const float* x, float* out, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    assert(x[i] >= 0.0f && "inputs must be non-negative");
    out[i] = sqrtf(x[i]);
  }
}

extern "C" int st_assert(const float* x, float* out, int n) {
  GMPO_LAUNCH(assert_kernel, 1, 32, 0, nullptr, x, out, n);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// 256 KiB of locals per thread: more than the default fiber stack (SIMT_STACK_KB
// raises it). out: (blockDim.x,).

__global__ void stack_overflow_kernel(float* out, int n) {
  volatile float big[64 * 1024];
  for (int i = 0; i < n; ++i) big[i] = static_cast<float>(i);
  out[threadIdx.x] = big[n - 1];
}

extern "C" int st_stack_overflow(float* out) {
  GMPO_LAUNCH(stack_overflow_kernel, 1, 4, 0, nullptr, out, 64 * 1024);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// A read of static shared memory past the slots the block wrote: thread 0 sums
// `nread` slots of which the first `nwrite` were written. The launcher first
// runs the kernel with every slot written as 0 (an earlier launch leaving zeros
// behind), then two blocks where block 0 writes all slots and block 1 only
// `nwrite`: the slots block 1 did not write must read as the 0xFF poison (NaN),
// never as what the earlier launch or block left. out: (2,).

__global__ void smem_uninit_kernel(float* out, int nwrite, int nread, float value) {
  __shared__ float slots[32];
  const int nw = blockIdx.x == 0 ? nread : nwrite;
  if (static_cast<int>(threadIdx.x) < nw) slots[threadIdx.x] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int k = 0; k < nread; ++k) s += slots[k];  // BUG: reads past the nw slots written
    out[blockIdx.x] = s;
  }
}

extern "C" int st_smem_uninit(float* out) {
  GMPO_LAUNCH(smem_uninit_kernel, 4, 32, 0, nullptr, out, 8, 8, 0.0f);   // leaves zeros in every copy
  int code = static_cast<int>(cudaGetLastError());
  if (code) return code;
  GMPO_LAUNCH(smem_uninit_kernel, 2, 32, 0, nullptr, out, 4, 8, 1.0f);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// A 16-byte vector load off the 16-byte grid (one float past an aligned
// buffer): plainly dereferenced (use_ldg 0) or through __ldg (1). On a GPU
// "misaligned address"; the emulation ends the block with the same error.
// x: (4 * blockDim.x + 4,), 16-byte aligned; out: (blockDim.x,).

__global__ void misaligned_kernel(const float* x, float* out, int use_ldg) {
  const float4* p = reinterpret_cast<const float4*>(x + 1) + threadIdx.x;  // BUG: x + 1 is not 16-byte aligned
  float4 v;
  if (use_ldg)
    v = __ldg(p);
  else
    v = *p;
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

extern "C" int st_misaligned(const float* x, float* out, int use_ldg) {
  GMPO_LAUNCH(misaligned_kernel, 1, 32, 0, nullptr, x, out, use_ldg);
  return static_cast<int>(cudaGetLastError());
}
