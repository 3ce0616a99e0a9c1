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
 *   GMPO_MAX_GRID_X, GMPO_MAX_GRID_Y
 *       the most blocks a launcher puts on grid.x / grid.y where its kernel has a
 *       grid-stride loop over that dimension (CUDA's limits by default). A build
 *       may lower them (-DGMPO_MAX_GRID_X=3 -DGMPO_MAX_GRID_Y=2: the SIMT
 *       emulation's tiny-grid build) so that every grid-stride loop takes
 *       several passes in a test.
 */
#ifndef GMPO_CUDA_LAUNCH_CUH
#define GMPO_CUDA_LAUNCH_CUH

#include <stdint.h>
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

#ifndef GMPO_MAX_GRID_X
#define GMPO_MAX_GRID_X 2147483647LL
#endif
#ifndef GMPO_MAX_GRID_Y
#define GMPO_MAX_GRID_Y 65535
#endif
#if GMPO_MAX_GRID_X < 1 || GMPO_MAX_GRID_X > 2147483647LL || GMPO_MAX_GRID_Y < 1 || GMPO_MAX_GRID_Y > 65535
#error "GMPO_MAX_GRID_X must be in [1, 2^31 - 1] and GMPO_MAX_GRID_Y in [1, 65535]"
#endif

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
