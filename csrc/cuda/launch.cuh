/*
 * launch.cuh -- what lets one CUDA C source build both with nvcc for the GPU and
 * with a host C++17 compiler under the SIMT emulation of tests/simt (-DGMPO_SIMT,
 * simt.h force-included, no CUDA header anywhere).
 *
 *   GMPO_LAUNCH(kernel, grid, block, smem, stream, args...)
 *       kernel<<<grid, block, smem, stream>>>(args...) under nvcc; the emulation's
 *       synchronous launcher otherwise. Wrap a template kernel in parentheses.
 *   GMPO_DYNAMIC_SMEM(type, name)
 *       `extern __shared__ type name[]` under nvcc (the emulation defines its own).
 *   GMPO_DEV
 *       __device__ __forceinline__: the small device helpers of the kernels.
 *   GMPO_CHECK_LAUNCH(a, what)
 *       right after a launch: on an error, the CUDA error string goes to a->err
 *       and the entry point returns GMPO_ECUDA.
 */
#ifndef GMPO_CUDA_LAUNCH_CUH
#define GMPO_CUDA_LAUNCH_CUH

#include <stdio.h>

#ifndef GMPO_SIMT
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define GMPO_LAUNCH(kernel, grid, block, smem, stream, ...) \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define GMPO_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#else
#ifndef GMPO_LAUNCH
#error "GMPO_SIMT builds must force-include tests/simt/simt.h"
#endif
#ifndef GMPO_DYNAMIC_SMEM
#define GMPO_DYNAMIC_SMEM(type, name) SIMT_DYNAMIC_SMEM(type, name)
#endif
#endif

#define GMPO_DEV __device__ __forceinline__

#define GMPO_CHECK_LAUNCH(a, what)                                                  \
    do {                                                                            \
        cudaError_t gmpo_e_ = cudaGetLastError();                                   \
        if (gmpo_e_ != cudaSuccess) {                                               \
            snprintf((a)->err, sizeof (a)->err, "CUDA error in %s: %s (%s)", what,  \
                     cudaGetErrorString(gmpo_e_), cudaGetErrorName(gmpo_e_));       \
            return GMPO_ECUDA;                                                      \
        }                                                                           \
    } while (0)

#endif /* GMPO_CUDA_LAUNCH_CUH */
