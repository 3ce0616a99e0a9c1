// Self-test kernels of the SIMT harness that are correct: each one must give
// the CPU's answer in the plain, ASan+UBSan and TSan builds with no report.
//
// Written like the project's kernels: CUDA C, extern "C" launchers that
// return a cudaError_t as int, GMPO_LAUNCH for launches and
// GMPO_DYNAMIC_SMEM for dynamic shared memory. Under nvcc the two macros are
// the usual <<< >>> and extern __shared__ forms (selftest.h), and the test
// suite compiles these files with nvcc too.

#include <stdint.h>

#include "selftest.h"

// ----------------------------------------------------------------------------
// helpers

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ----------------------------------------------------------------------------
// block sum: row b of x (B rows of n floats) is summed by block b, then every
// element is centered on the row mean.
// x, centered: (B, n); sums: (B,). blockDim.x: a multiple of 32, at most 1024.
// kFirstBarrier = false is the planted bug "a __syncthreads removed".

template <bool kFirstBarrier>
__global__ void __launch_bounds__(1024)
    block_sum_kernel(const float* __restrict__ x, float* __restrict__ sums, float* __restrict__ centered, int64_t n) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const int nwarps = blockDim.x / warpSize;
  const float* row = x + blockIdx.x * n;

  float v = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += __ldg(row + i);
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  if (kFirstBarrier) __syncthreads();  // warp_sums complete before warp 0 reads them
  if (warp == 0) {
    v = lane < nwarps ? warp_sums[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) total = v;
  }
  __syncthreads();  // total visible to every thread
  const float mean = total / static_cast<float>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) centered[blockIdx.x * n + i] = row[i] - mean;
  if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

extern "C" int st_block_sum(const float* x, float* sums, float* centered, int64_t rows, int64_t n, int threads,
                            int first_barrier) {
  if (first_barrier)
    GMPO_LAUNCH(block_sum_kernel<true>, dim3(static_cast<unsigned>(rows)), dim3(threads), 0, nullptr, x, sums,
                centered, n);
  else
    GMPO_LAUNCH((block_sum_kernel<false>), dim3(static_cast<unsigned>(rows)), dim3(threads), 0, nullptr, x, sums,
                centered, n);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// histogram in dynamic shared memory with atomics: keys (n,) -> hist (nbins,)
// plus float and double sums, the max key and an element count, all through
// global atomics. smem_bins sizes the dynamic shared memory: nbins is right,
// nbins - 1 is the planted bug "dynamic shared memory sized too small".

__global__ void histogram_kernel(const int* __restrict__ keys, int64_t n, int nbins, unsigned* __restrict__ hist,
                                 float* fsum, double* dsum, int* kmax, unsigned long long* count) {
  GMPO_DYNAMIC_SMEM(unsigned, bins);
  for (int i = threadIdx.x; i < nbins; i += blockDim.x) bins[i] = 0;
  __syncthreads();
  unsigned long long mine = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int k = keys[i];
    atomicAdd(&bins[k % nbins], 1u);
    atomicMax(kmax, k);
    atomicAdd(fsum, static_cast<float>(k % 8));
    atomicAdd(dsum, 0.5 * k);
    ++mine;
  }
  if (mine) atomicAdd(count, mine);
  __syncthreads();
  for (int i = threadIdx.x; i < nbins; i += blockDim.x)
    if (bins[i]) atomicAdd(&hist[i], bins[i]);
}

extern "C" int st_histogram(const int* keys, int64_t n, int nbins, unsigned* hist, float* fsum, double* dsum,
                            int* kmax, unsigned long long* count, int blocks, int threads, int smem_bins) {
  const size_t smem = static_cast<size_t>(smem_bins) * sizeof(unsigned);
  GMPO_LAUNCH(histogram_kernel, blocks, threads, smem, nullptr, keys, n, nbins, hist, fsum, dsum, kmax, count);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// warp and block primitives against CUDA's documented semantics. One block of
// 64 threads; out: (64, ST_WARP_OUTS) ints, compared with the driver's model.

__global__ void warp_semantics_kernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * ST_WARP_OUTS;
  o[0] = __shfl_sync(0xffffffffu, t * 10, lane + 3);                     // src lane taken modulo 32
  o[1] = __shfl_up_sync(0xffffffffu, t, 3, 16);                          // own value below lane 3 of a 16-segment
  o[2] = static_cast<int>(__shfl_down_sync(0xffffffffu, static_cast<float>(t), 5, 8));
  o[3] = static_cast<int>(__shfl_xor_sync(0xffffffffu, static_cast<double>(t), 1));
  o[4] = __shfl_xor_sync(0xffffffffu, t, 8, 8);                          // later segment: own value
  const long long big = (static_cast<long long>(t) << 40) | t;
  o[5] = static_cast<int>(__shfl_xor_sync(0xffffffffu, big, 16) >> 40);  // 64-bit payload
  o[6] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[7] = __any_sync(0xffffffffu, t == 40) * 2 + __all_sync(0xffffffffu, t < 48);
  o[8] = __syncthreads_count(t % 5 == 0);
  o[9] = __syncthreads_and(t < 64) * 2 + __syncthreads_or(t == 63);
  o[10] = static_cast<int>(__activemask());
  o[11] = -1;
  if (lane < 16) o[11] = __shfl_xor_sync(0x0000ffffu, t, 1);             // a half-warp mask
  o[12] = static_cast<int>(__reduce_add_sync(0xffffffffu, static_cast<unsigned>(lane)));
  o[13] = __reduce_max_sync(0xffffffffu, (lane * 7) % 32 - 16);
  o[14] = static_cast<int>(__shfl_up_sync(0xffffffffu, static_cast<unsigned long long>(t), 33));  // delta & 31 = 1
  __syncwarp();
  unsigned* slot = reinterpret_cast<unsigned*>(o + 15);  // atomics need global (or shared) memory
  atomicExch(slot, 5u);
  const int old = static_cast<int>(atomicCAS(slot, 5u, 7u));
  o[15] = old * 100 + static_cast<int>(*slot);
}

extern "C" int st_warp_semantics(int* out) {
  GMPO_LAUNCH(warp_semantics_kernel, 1, 64, 0, nullptr, out);
  return static_cast<int>(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// launches the emulation must refuse the way CUDA does; returns the error code.

__global__ void noop_kernel(int* p) {
  if (p) p[threadIdx.x] = 1;
}

extern "C" int st_bad_launch(int which) {
  switch (which) {
    case 0: GMPO_LAUNCH(noop_kernel, 1, 1025, 0, nullptr, nullptr); break;              // block too large
    case 1: GMPO_LAUNCH(noop_kernel, 0, 32, 0, nullptr, nullptr); break;                // empty grid
    case 2: GMPO_LAUNCH(noop_kernel, dim3(1, 65536), 32, 0, nullptr, nullptr); break;   // grid.y too large
    case 3: GMPO_LAUNCH(noop_kernel, 1, 32, 228 * 1024, nullptr, nullptr); break;       // above 227 KiB
    case 4: GMPO_LAUNCH(noop_kernel, 1, 32, 64 * 1024, nullptr, nullptr); break;        // above 48 KiB, no opt-in
    default: {
      cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
      GMPO_LAUNCH(noop_kernel, 1, 32, 64 * 1024, nullptr, nullptr);                    // opted in: fine
    }
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* st_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
extern "C" const char* st_error_name(int code) { return cudaGetErrorName(static_cast<cudaError_t>(code)); }
